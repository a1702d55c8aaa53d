"""Every allreduce backend of the benchmark, and the shared-memory allreduce above all,
against numpy: sizes from 1 element to 64 MiB, sizes not divisible by the rank count,
every dtype and op. Run under mpirun by tests/test_bench.py."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from distlaunch.bench import Backends, expected, pattern

pytestmark = pytest.mark.mpi(min_size=2)
MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD
DTYPES = ["float16", "float32", "float64", "int32", "int64"]
COUNTS = [1, 2, 3, 7, 1023, 262_147, (1 << 20) // 4 + 5]  # odd ones on purpose, then 1 MiB + a bit


@pytest.fixture(scope="module")
def backends():
    names = ["mpi4py", "shm", "torch"]
    if importlib.util.find_spec("horovod") is not None:
        names.append("horovod")
    made = {op: Backends(COMM, names, op) for op in ("sum", "min", "max", "prod")}
    yield made
    for backend in made.values():
        backend.close()


@pytest.mark.parametrize("op", ["sum", "min", "max", "prod"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", COUNTS)
def test_shm_allreduce_matches_numpy(backends, op, dtype, count):
    if op == "prod" and count > 1023:
        pytest.skip("products overflow on big buffers; small ones cover prod")
    dt = np.dtype(dtype)
    send = pattern(count, COMM.rank, dt)
    recv = np.zeros_like(send)
    backends[op].fn("shm")(send, recv)
    np.testing.assert_array_equal(recv, expected(count, COMM.size, op, dt))
    assert np.array_equal(send, pattern(count, COMM.rank, dt)), "send must not change"


def test_shm_allreduce_in_place_and_64_mib(backends):
    count = (64 << 20) // 4
    buf = pattern(count, COMM.rank, np.dtype("float32"))
    backends["sum"].fn("shm")(buf, buf)
    np.testing.assert_array_equal(buf, expected(count, COMM.size, "sum", np.dtype("float32")))


@pytest.mark.parametrize("name", ["mpi4py", "torch", "horovod"])
@pytest.mark.parametrize("count", [1, 1023, 262_147])
def test_other_backends_match_numpy(backends, name, count):
    if name not in backends["sum"].names:
        pytest.skip(f"{name} not installed")
    dt = np.dtype("float32")
    send = pattern(count, COMM.rank, dt)
    recv = np.zeros_like(send)
    backends["sum"].fn(name)(send, recv)
    np.testing.assert_array_equal(recv, expected(count, COMM.size, "sum", dt))
