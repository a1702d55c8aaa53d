"""distlaunch.hvd against numpy and against real Horovod: the parity suite in tests/mpi
runs under real mpirun (via distlaunch run) once per backend and rank count."""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS, backends, installed_backends, oversubscribe

pytestmark = pytest.mark.slow
BACKENDS = backends()
PARITY = REPO / "tests" / "mpi" / "test_hvd_parity.py"
HOROVOD_ENV = {"HOROVOD_DYNAMIC_PROCESS_SETS": "1", "HOROVOD_TIMELINE": "DYNAMIC"}  # what the suite's tests need


def run_job(tmp: Path, backend: str | None, ranks: int, *argv: str, env: dict[str, str] | None = None,
            launcher: str = "distlaunch", timeout: float = 300,
            options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``argv`` under distlaunch run (with ``options``) or plain mpirun; ``backend`` None
    leaves DISTLAUNCH_HVD_BACKEND to the options."""
    full_env = {**os.environ, "OUT_DIR": str(tmp), **(env or {})}
    full_env.pop("DISTLAUNCH_HVD_BACKEND", None)
    full_env.update({"DISTLAUNCH_HVD_BACKEND": backend} if backend else {})
    if launcher == "distlaunch":
        cmd = [sys.executable, "-m", "distlaunch", "run", "--ppn", str(ranks), *oversubscribe(ranks),
               "--run-dir", str(tmp / "runs"), *options,
               *argv]
    else:  # plain mpirun, as a user without distlaunch's launcher would
        from distlaunch.plan.mpi import find_mpirun

        cmd = [find_mpirun(), "-n", str(ranks), "--oversubscribe", "--bind-to", "none", "--mca", "btl", "^ofi",
               *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
               *([sys.executable] if argv[0].endswith(".py") else []), *argv]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def runtimes() -> list:
    """torch, and real Horovod with each of its CPU operations (Gloo's are its default
    where no rank has CUDA, under distlaunch and plain mpirun alike)."""
    params = []
    for backend in BACKENDS:
        name = getattr(backend, "values", [backend])[0]
        marks = getattr(backend, "marks", ())
        for ops in (("mpi", "gloo") if name == "horovod" else ("mpi",)):
            params.append(pytest.param(name, ops, marks=marks, id=f"{name}-{ops}" if name == "horovod" else name))
    return params


@pytest.mark.parametrize("ranks", [2, 3, 4])  # an odd size catches what powers of two hide
@pytest.mark.parametrize("backend,ops", runtimes())
def test_parity_suite(tmp_path, backend, ops, ranks):
    result = run_job(tmp_path, backend, ranks, sys.executable, "-m", "pytest", "--with-mpi", "-q",
                     "-p", "no:cacheprovider", str(PARITY),
                     env={"PARITY_OUT": str(tmp_path), "DISTLAUNCH_HVD_OPS": ops, **HOROVOD_ENV})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert re.search(r"^\[0\] \d+ passed", result.stdout, re.M), result.stdout[-3000:]


def test_parity_suite_on_the_gloo_path(tmp_path):
    """The torch backend's allreduce through gloo, as on nodes with uneven rank counts
    (the suite asserts that this path, not shared memory, was taken)."""
    result = run_job(tmp_path, "torch", 2, sys.executable, "-m", "pytest", "--with-mpi", "-q",
                     "-p", "no:cacheprovider", str(PARITY),
                     env={"DISTLAUNCH_HVD_ALLREDUCE": "gloo", **HOROVOD_ENV})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert re.search(r"^\[0\] \d+ passed", result.stdout, re.M), result.stdout[-3000:]
    assert "skipped" not in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_and_unfused_training_are_bitwise_identical(tmp_path, backend):
    import torch

    for threshold in ("0", "134217728"):
        result = run_job(tmp_path, backend, 2, sys.executable, "-m", "pytest", "--with-mpi", "-q",
                         "-p", "no:cacheprovider", "-k", "matches_single_process", str(PARITY),
                         env={"PARITY_OUT": str(tmp_path), "HOROVOD_FUSION_THRESHOLD": threshold})
        assert result.returncode == 0, result.stdout[-4000:]
    unfused = torch.load(tmp_path / f"weights-{backend}-0.pt")
    fused = torch.load(tmp_path / f"weights-{backend}-134217728.pt")
    assert torch.equal(unfused, fused)


@pytest.mark.parametrize("backend", BACKENDS)
def test_process_sets_given_to_init(tmp_path, backend):
    result = run_job(tmp_path, backend, 3, str(SCRIPTS / "hvd_static_sets.py"), launcher="mpirun", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    refused = "add:Set HOROVOD_DYNAMIC_PROCESS_SETS=1 to allow adding process sets after Horovod initialization."
    assert lines == [
        f"rank 0: set1:0/2:sum=1:root=1 {refused}",
        f"rank 1: set1:1/2:sum=1:root=1 set2:0/2:sum=3:root=2 {refused}",
        f"rank 2: set2:1/2:sum=3:root=2 {refused}",
    ], result.stdout


def losses(stdout: str) -> list[str]:
    return re.findall(r"epoch \d+: loss (\d+\.\d+)", stdout)


def test_example_trains_identically_on_every_backend(tmp_path):
    """Every backend, and real Horovod with its Gloo operations too (the ranks serve
    Horovod's own rendezvous, as horovodrun --gloo does): chosen by default, by the
    variable, and by distlaunch run's --hvd-backend/--hvd-ops."""
    seen = {}
    runs = [(backend, "mpi", ()) for backend in installed_backends()]
    if "horovod" in installed_backends():
        runs += [("horovod", "gloo", ()), ("horovod", "", ()),
                 (None, "", ("--hvd-backend", "horovod", "--hvd-ops", "gloo"))]
    cuda = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True).stdout.strip() == "True"
    for backend, ops, options in runs:
        result = run_job(tmp_path, backend, 2, str(REPO / "examples" / "train.py"), "--epochs", "2",
                         env={"DISTLAUNCH_HVD_OPS": ops}, options=options)
        assert result.returncode == 0, result.stderr[-3000:]
        runtime = backend or "horovod"
        assert f"with the {runtime} backend" in result.stdout
        said = [line for line in (result.stdout + result.stderr).splitlines() if "distlaunch.hvd: " in line]
        assert len(said) == 1 and said[0].startswith("[0] "), said  # one start-up line, from rank 0
        if runtime == "horovod":
            chosen = "gloo" if options else ops
            words = "MPI" if chosen == "mpi" or (chosen == "" and cuda) else "Gloo"
            assert f"({words} operations)" in result.stdout, result.stdout[-2000:]
            why = (f"DISTLAUNCH_HVD_OPS={chosen}" if chosen else
                   "the default where a rank has CUDA" if cuda else "the default where no rank has CUDA")
            version = importlib.metadata.version("horovod")
            assert f"real Horovod {version} with {words} operations (DISTLAUNCH_HVD_BACKEND=horovod; {why}" \
                in said[0], said
        else:
            assert "distlaunch's torch backend, collectives through this node's shared memory" in said[0], said
        key = f"{runtime}/{ops}/{' '.join(options)}"
        seen[key] = losses(result.stdout)
        assert len(seen[key]) == 3 and float(seen[key][-1]) < float(seen[key][0])
    assert len({tuple(v) for v in seen.values()}) == 1, seen


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", [b])[0] == "horovod"])
def test_real_horovod_gloo_default_at_each_init(tmp_path, backend):
    """Each hvd.init serves a fresh rendezvous (a re-init after shutdown does not reach
    for the old one), hvd.shutdown's successor cleans up, and a communicator given to
    hvd.init turns the default to MPI's operations, as the start-up line says (before any
    CUDA or host-name check, so on every host)."""
    reinit = run_job(tmp_path, backend, 2, str(SCRIPTS / "hvd_gloo_init.py"), "reinit",
                     env={"DISTLAUNCH_HVD_OPS": "gloo"})  # asked for: the same on hosts with CUDA
    assert reinit.returncode == 0, reinit.stderr[-3000:]
    rounds = re.findall(r"^\[0\] round (\d): gloo=(\w+) port=(\d+) sum=\[3.0, 3.0, 3.0\]$", reinit.stdout, re.M)
    assert [(r, g) for r, g, _ in rounds] == [("0", "True"), ("1", "True")], reinit.stdout[-2000:]
    assert rounds[0][2] != rounds[1][2], rounds  # a new rendezvous server for the second init
    assert "[0] left nothing" in reinit.stdout and "[1] left nothing" in reinit.stdout  # shutdown cleans up
    assert "[0] servers stopped" in reinit.stdout, reinit.stdout[-2000:]  # both rendezvous servers are gone
    comm = run_job(tmp_path, backend, 2, str(SCRIPTS / "hvd_gloo_init.py"), "comm")
    assert comm.returncode == 0, comm.stderr[-3000:]
    assert re.search(r"^\[1\] round 0: gloo=False port=None sum=\[3.0, 3.0, 3.0\]$", comm.stdout, re.M), comm.stdout
    assert "with MPI operations (DISTLAUNCH_HVD_BACKEND=horovod; hvd.init was given a communicator" in \
        comm.stdout + comm.stderr
    assert "[0] left nothing" in comm.stdout


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", [b])[0] == "horovod"])
def test_the_gloo_rendezvous_answers_a_key_when_it_is_put(backend, monkeypatch):
    """Horovod's rendezvous server as the ranks serve it: a GET for a key not there yet
    waits for its PUT and answers it then (Horovod's own answers 404, and its store sleeps
    10 ms before asking again); one that never comes is a 404 after LONG_POLL_S, as at
    once before; closing answers the GETs still waiting at once."""
    import threading
    import urllib.error
    import urllib.request

    from distlaunch.hvd import horovod_gloo

    monkeypatch.setattr(horovod_gloo, "LONG_POLL_S", 3.0)
    server = horovod_gloo._long_poll_server()(("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/global"

    def get(key: str) -> tuple[int, bytes, float]:
        start = time.monotonic()
        try:
            with urllib.request.urlopen(f"{url}/{key}", timeout=10) as answer:
                return answer.status, answer.read(), time.monotonic() - start
        except urllib.error.HTTPError as error:
            return error.code, b"", time.monotonic() - start

    def put(key: str, value: bytes, after: float) -> None:
        time.sleep(after)
        urllib.request.urlopen(urllib.request.Request(f"{url}/{key}", data=value, method="PUT"), timeout=10).close()

    try:
        threading.Thread(target=put, args=("1", b"address of rank 1", 0.3)).start()
        status, body, took = get("1")
        assert (status, body) == (200, b"address of rank 1") and 0.25 < took < 2.0, (status, body, took)
        assert get("1")[:2] == (200, b"address of rank 1")  # there already: answered at once
        monkeypatch.setattr(horovod_gloo, "LONG_POLL_S", 0.3)
        status, body, took = get("never")
        assert status == 404 and 0.25 < took < 2.0, (status, took)
        monkeypatch.setattr(horovod_gloo, "LONG_POLL_S", 30.0)
        threading.Timer(0.3, server.close_waits).start()
        status, body, took = get("never")
        assert status == 404 and took < 5.0, (status, took)
    finally:
        server.shutdown()
        server.server_close()


PMIX_OPTION = """import os
from mpi4py import MPI
from pmix_nodelay import nodelay

before = nodelay()
import distlaunch.hvd as hvd
hvd.init()
with open(os.path.join(os.environ["OUT_DIR"], f"nodelay-{hvd.rank()}"), "w") as said:
    said.write(repr((before, nodelay())))
hvd.shutdown()
"""


@pytest.mark.parametrize("launcher", ["distlaunch", "mpirun"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hvd_init_switches_nagle_off_on_the_ranks_pmix_connection(tmp_path, backend, launcher):
    """Each rank's connection to its PMIx server (Open MPI's runtime, found from the
    server's address in its environment) has Nagle's algorithm on once MPI started, and
    off after ``hvd.init()``, under distlaunch and plain mpirun alike, so that MPI's
    finalize does not wait for a delayed acknowledgement (``distlaunch.rank.pmixlink``)."""
    from distlaunch.plan.mpi import Flavour, detect, find_mpirun

    script = tmp_path / "pmix_option.py"
    script.write_text(PMIX_OPTION)
    shutil.copy(SCRIPTS / "pmix_nodelay.py", tmp_path)
    result = run_job(tmp_path, backend, 2, str(script), launcher=launcher, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    pmix = detect(find_mpirun()).flavour is Flavour.OPENMPI  # MPICH's Hydra has no PMIx server: nothing to find
    for rank in (0, 1):
        before, after = eval((tmp_path / f"nodelay-{rank}").read_text())  # noqa: S307 - the script's own repr
        assert (before and set(before) == {0}) if pmix else before == [], (rank, before)
        assert after == [1] * len(before), (rank, after)


@pytest.mark.parametrize("launcher", ["distlaunch", "mpirun"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_mid_training_ends_the_job_fast(tmp_path, backend, launcher):
    start = time.time()
    result = run_job(tmp_path, backend, 2, str(SCRIPTS / "hvd_crash.py"), launcher=launcher, timeout=120)
    ended = time.time()
    assert result.returncode != 0
    assert "not reached" not in result.stdout
    assert "RuntimeError: crash in rank 1 at step 3" in result.stdout + result.stderr
    crash = float((tmp_path / "crash-time").read_text())
    assert ended - crash < 10, f"job took {ended - crash:.1f} s to end after the crash"
    assert ended - start < 90


def test_byte_tensor_owns_its_memory():
    """What the rounds hand gloo is a copy with storage of its own (a frombuffer tensor
    would share the Python buffer and release it through the GIL from gloo's thread)."""
    from distlaunch.hvd.core import byte_tensor

    data = bytearray(b"abc")
    tensor = byte_tensor(data)
    data[0] = ord("z")
    assert bytes(tensor.numpy()) == b"abc" and tensor.dtype.is_floating_point is False
    assert byte_tensor(b"").numel() == 0
