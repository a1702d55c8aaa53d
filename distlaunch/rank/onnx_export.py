"""``distlaunch.export_onnx``: export the trained model to ONNX from rank 0, and check it.

Rank 0 unwraps the model (DistributedDataParallel's ``.module``), exports it with
``torch.onnx.export`` (the TorchScript exporter, which needs no extra package), runs
``onnx.checker``, and when onnxruntime is installed compares its outputs with the
torch model's and records the largest difference as the metric ``onnx_max_abs_diff``.
The other ranks wait at a barrier when a distributed job is running. A relative path
under ``outputs/`` lands in the run's outputs folder.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..protocol import OUTPUT_DIR
from .metrics import log_metric


def _resolve(path: str) -> Path:
    out = os.environ.get(OUTPUT_DIR)
    parts = Path(path).parts
    if out and not os.path.isabs(path) and parts[:1] == ("outputs",):
        return Path(out).joinpath(*parts[1:])
    return Path(path)


def _barrier() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            return
    except ImportError:
        return
    try:
        import horovod.torch as real

        if real.is_initialized():
            real.barrier()
    except (ImportError, ValueError):
        pass


def export_onnx(model: Any, example_inputs: Any, path: str = "outputs/model.onnx",
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                opset_version: int | None = None, dynamic_batch: bool = True) -> Path | None:
    """Export on rank 0; returns the file there, None on other ranks. With
    ``dynamic_batch`` the first dimension of every input and output may vary."""
    import torch

    from .rankinfo import from_environ

    target = _resolve(path)
    if from_environ().rank == 0:
        inner = getattr(model, "module", model)
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        target.parent.mkdir(parents=True, exist_ok=True)
        inner.eval()
        names_in = input_names or (["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))])
        names_out = output_names or ["output"]
        kwargs: dict[str, Any] = {"input_names": names_in, "output_names": names_out, "dynamo": False}
        if dynamic_batch:
            kwargs["dynamic_axes"] = {name: {0: "batch"} for name in [*names_in, *names_out]}
        if opset_version is not None:
            kwargs["opset_version"] = opset_version
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(inner, inputs, str(target), **kwargs)
        import onnx

        onnx.checker.check_model(onnx.load(str(target)))
        diff = compare_with_onnxruntime(inner, inputs, target)
        if diff is not None:
            log_metric("onnx_max_abs_diff", diff)
    _barrier()
    return target if from_environ().rank == 0 else None


def compare_with_onnxruntime(model: Any, inputs: tuple[Any, ...], path: Path) -> float | None:
    """Largest |torch − onnxruntime| over the outputs; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import numpy as np
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: tensor.detach().cpu().numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    with torch.no_grad():
        expected = model(*inputs)
    expected_list = expected if isinstance(expected, (tuple, list)) else [expected]
    got = session.run(None, feeds)
    return float(max(np.max(np.abs(e.detach().cpu().numpy() - g)) for e, g in zip(expected_list, got)))
