"""Every allreduce backend of the benchmark, and the shared-memory allreduce above all,
against numpy: sizes from 1 element to 64 MiB, sizes not divisible by the rank count,
every dtype and op. Run under mpirun by tests/test_bench.py."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from distlaunch.hvd.bench import Backends, expected, measure, pattern
from distlaunch.hvd.shm_allreduce import CHUNK

pytestmark = pytest.mark.mpi(min_size=2)
MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD
DTYPES = ["float16", "float32", "float64", "int32", "int64"]
COUNTS = [1, 2, 3, 7, 1023, 262_147, CHUNK // 4 + 5]  # odd ones on purpose, then one default step + a bit


OTHERS = ["mpi4py", "torch"] + (["horovod"] if importlib.util.find_spec("horovod") is not None else [])
# products of many elements overflow every dtype: prod is checked on the small counts only
CASES = [(op, dtype, count) for op in ("sum", "min", "max", "prod") for dtype in DTYPES for count in COUNTS
         if op != "prod" or count <= 1023]


@pytest.fixture(scope="module")
def backends():
    made = {op: Backends(COMM, ["shm", *OTHERS], op) for op in ("sum", "min", "max", "prod")}
    yield made
    for backend in made.values():
        backend.close()


@pytest.mark.parametrize("op,dtype,count", CASES)
def test_shm_allreduce_matches_numpy(backends, op, dtype, count):
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


@pytest.mark.parametrize("name", OTHERS)
@pytest.mark.parametrize("count", [1, 1023, 262_147])
def test_other_backends_match_numpy(backends, name, count):
    dt = np.dtype("float32")
    send = pattern(count, COMM.rank, dt)
    recv = np.zeros_like(send)
    backends["sum"].fn(name)(send, recv)
    np.testing.assert_array_equal(recv, expected(count, COMM.size, "sum", dt))


def one_node() -> bool:
    local = COMM.Split_type(MPI.COMM_TYPE_SHARED)
    alone = local.size == COMM.size
    local.Free()
    return alone


@pytest.fixture(scope="module")
def tiny_steps():
    """The pipelined path with the smallest steps: many steps, an odd tail, three slot sets
    rotating within one call and across calls."""
    from distlaunch.hvd.shm_allreduce import ShmAllreduce

    shm = ShmAllreduce(COMM, chunk=4096)
    yield shm
    shm.close()


def test_shm_steps_are_cut_alike_on_every_rank_whatever_each_asked():
    """The step is the least any rank would take (a rank asked for another chunk, or one on a
    node with a smaller /dev/shm): else the ranks would pass different numbers of barriers."""
    from distlaunch.hvd.shm_allreduce import SEGMENT, SETS, SHM_SHARE, STEP_MIN, ShmAllreduce, shm_bytes

    shm = ShmAllreduce(COMM, chunk=4096 if COMM.rank == COMM.size - 1 else 12_288)
    try:
        assert COMM.allgather(shm.chunk) == [4096] * COMM.size  # every rank fails alike, or none
        count = 10_007  # about ten steps of 4 KiB in float32
        send = pattern(count, COMM.rank, np.dtype("float32"))
        recv = np.empty_like(send)
        shm.allreduce(send, recv, "sum")
        np.testing.assert_array_equal(recv, expected(count, COMM.size, "sum", np.dtype("float32")))
    finally:
        shm.close()
    default = ShmAllreduce(COMM)
    try:
        assert len(set(COMM.allgather(default.chunk))) == 1
        assert default.chunk <= CHUNK and default.chunk % 64 == 0
        segment = SETS * default.size * default.chunk
        assert segment <= SEGMENT
        assert shm_bytes() is None or default.chunk <= STEP_MIN or segment <= shm_bytes() // SHM_SHARE
    finally:
        default.close()


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("dtype", ["float16", "float64", "int32"])
@pytest.mark.parametrize("count", [2049, 10_007, 100_003])
def test_shm_many_steps_match_numpy(tiny_steps, in_place, op, dtype, count):
    dt = np.dtype(dtype)
    send = pattern(count, COMM.rank, dt)
    recv = send if in_place else np.full_like(send, 99)
    tiny_steps.allreduce(send, recv, op)
    np.testing.assert_array_equal(recv, expected(count, COMM.size, op, dt))
    if not in_place:
        assert np.array_equal(send, pattern(count, COMM.rank, dt)), "send must not change"


@pytest.mark.parametrize("count", [5, 3_000, 300_001, 2 * CHUNK // 4 + 3])  # the last: three default steps
def test_shm_float_sums_are_bitwise_alike_on_every_rank(backends, count):
    """Random floats: every rank gets the very same bits; on one node they are the sum in
    rank order (what fused and unfused gradients rely on to match bitwise)."""
    inputs = [np.random.default_rng(seed).standard_normal(count).astype(np.float32) for seed in range(COMM.size)]
    recv = np.empty(count, np.float32)
    backends["sum"].fn("shm")(inputs[COMM.rank].copy(), recv)
    everyone = COMM.allgather(recv.tobytes())
    assert len(set(everyone)) == 1, "ranks got different bits"
    if one_node():
        in_order = inputs[0].copy()
        for part in inputs[1:]:
            in_order += part
        assert recv.tobytes() == in_order.tobytes()
    else:
        np.testing.assert_allclose(recv, np.sum(np.stack(inputs).astype(np.float64), axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["sum", "prod"])
def test_wrong_results_are_counted(backends, op):
    """The benchmark's #wrong is a real check: a backend that only copies its input, or
    gets one element wrong on one rank, is caught."""
    dt, count = np.dtype("float32"), 1000
    want = expected(count, COMM.size, op, dt)
    send, recv = pattern(count, COMM.rank, dt), np.empty(count, dt)

    def copies(s: np.ndarray, r: np.ndarray) -> None:
        r[:] = s

    def off_by_one(s: np.ndarray, r: np.ndarray) -> None:
        backends[op].fn("mpi4py")(s, r)
        if COMM.rank == COMM.size - 1:
            r[count // 2] = 2 * r[count // 2] + 1

    assert measure(COMM, "copies", copies, send, recv, want, op, 1, 0)["wrong"] > 0
    assert measure(COMM, "off-by-one", off_by_one, send, recv, want, op, 1, 0)["wrong"] == 1
    assert measure(COMM, "mpi4py", backends[op].fn("mpi4py"), send, recv, want, op, 1, 0)["wrong"] == 0
