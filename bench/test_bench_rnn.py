"""pytest-benchmark versions of the bench_rnn.py cases, for tracking regressions.

Not part of the test suite (tests/): run them explicitly, e.g.

    pytest bench/ --benchmark-only
    pytest bench/ --benchmark-only --benchmark-autosave          # store a baseline
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Each (cell, mode) is one benchmark group holding a torch.nn and a fastrnn entry.
The shape is small by default; override with environment variables:
FASTRNN_BENCH_SHAPE="B,T,I,H", FASTRNN_BENCH_DTYPE=float32|float64|bfloat16,
FASTRNN_BENCH_DEVICE=cpu|cuda.
"""
import functools
import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # works under any --import-mode
from bench_rnn import CELLS, DTYPES, MODES, check_agree, make_case, rnn_flops, sync  # noqa: E402

SHAPE = tuple(int(v) for v in os.environ.get("FASTRNN_BENCH_SHAPE", "8,32,64,64").split(","))
DTYPE = DTYPES[os.environ.get("FASTRNN_BENCH_DTYPE", "float32")]
DEVICE = torch.device(os.environ.get("FASTRNN_BENCH_DEVICE", "cpu"))


@functools.lru_cache(maxsize=None)
def checked_case(cell, mode):
    """Build a case once and check that fastrnn agrees with torch before timing either."""
    run_torch, run_fast, steps = make_case(cell, mode, *SHAPE, dtype=DTYPE, device=DEVICE)
    check_agree(run_torch, run_fast, DTYPE)
    return run_torch, run_fast, steps


@pytest.mark.parametrize("impl", ["torch", "fastrnn"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_rnn(benchmark, cell, mode, impl):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    run_torch, run_fast, steps = checked_case(cell, mode)
    fn = run_torch if impl == "torch" else run_fast

    def call():
        fn()
        sync(DEVICE)  # on a GPU, time the work rather than the launch

    B, T, I, H = SHAPE
    benchmark.group = f"{cell} {mode} B={B} T={T} I={I} H={H} {str(DTYPE).split('.')[-1]} {DEVICE}"
    benchmark.extra_info["gflop"] = rnn_flops(cell, steps, I, H, training=mode != "inference") / 1e9
    benchmark(call)
