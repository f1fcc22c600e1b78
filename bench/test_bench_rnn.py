"""pytest-benchmark versions of the bench_rnn.py cases, for tracking regressions.

Not part of the test suite (tests/): run them explicitly, e.g.

    pytest bench/ --benchmark-only
    pytest bench/ --benchmark-only --benchmark-autosave          # store a baseline
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Each (cell, mode) is one benchmark group holding a torch.nn and a fastrnn entry.
The shape is small by default; override with environment variables:
FASTRNN_BENCH_SHAPE="B,T,I,H", FASTRNN_BENCH_DTYPE=float32|float64|bfloat16,
FASTRNN_BENCH_DEVICE=cpu|cuda.

The other tests here are quick checks of the harness itself (GEMM peak,
theoretical FMA peak, bench_gemm.py); --benchmark-only skips them.
"""
import functools
import importlib.util
import json
import os
import re
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # works under any --import-mode
import bench_gemm  # noqa: E402
import bench_rnn  # noqa: E402
from bench_rnn import (CELLS, DTYPES, MODES, check_agree, cpu_model, fma_peak, gemm_peak,  # noqa: E402
                       make_case, rnn_flops, sync)

if importlib.util.find_spec("pytest_benchmark") is None:
    @pytest.fixture
    def benchmark():
        pytest.skip("needs pytest-benchmark")

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


# --- the harness itself ---------------------------------------------------------------------

CPU = torch.device("cpu")


def test_gemm_peak_is_the_best_measured_rate():
    g = gemm_peak(64, torch.float32, CPU, repeats=1)
    measured = {name: rate for name, rate in (("torch.mm", g["mm"]), ("oneDNN", g["onednn"])) if rate is not None}
    assert g["peak"] == max(measured.values())
    assert g["source"] == max(measured, key=measured.get)


@pytest.mark.parametrize("t_mm, t_onednn, source", [(2.0, 1.0, "oneDNN"), (1.0, 2.0, "torch.mm")])
def test_gemm_peak_picks_the_faster(monkeypatch, t_mm, t_onednn, source):
    monkeypatch.setattr(bench_rnn, "time_interleaved",
                        lambda fns, *args: {"torch.mm": [t_mm], "oneDNN": [t_onednn]})
    g = gemm_peak(8, torch.float32, CPU)
    assert (g["mm"], g["onednn"]) == (2 * 8**3 / t_mm / 1e9, 2 * 8**3 / t_onednn / 1e9)
    assert g["source"] == source and g["peak"] == max(g["mm"], g["onednn"])


def test_gemm_peak_without_onednn_is_torch_mm(monkeypatch):
    monkeypatch.setattr(bench_rnn, "try_onednn_matmul", lambda a, b: (None, "unavailable: test"))
    g = gemm_peak(32, torch.float64, CPU, repeats=1)
    assert g["onednn"] is None and g["onednn_note"] == "unavailable: test"
    assert g["source"] == "torch.mm" and g["peak"] == g["mm"] > 0


def test_onednn_matmul_is_a_matmul():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    fn, note = bench_rnn.try_onednn_matmul(a, b)
    if fn is None:
        pytest.skip(f"oneDNN {note}")
    torch.testing.assert_close(fn(a), a @ b)
    at = torch.randn(7, 5).t()  # a transposed view, as bench_gemm.py's weight gradient
    torch.testing.assert_close(fn(at), at @ b)


def cpuinfo(flags, mhz="2600.000"):
    """Two processors of /proc/cpuinfo text with the given flags."""
    block = f"processor\t: {{}}\nmodel name\t: Test CPU\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n"
    return "\n".join(block.format(i) for i in range(2))


AVX512 = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512vl"
AVX2 = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2"


@pytest.mark.parametrize("flags, dtype, isa, lanes", [
    (AVX512, torch.float32, "avx512f", 16), (AVX512, torch.float64, "avx512f", 8),
    (AVX2, torch.float32, "avx2+fma", 8), (AVX2, torch.float64, "avx2+fma", 4),
])
def test_fma_peak_vector_width(flags, dtype, isa, lanes):
    theo = fma_peak(cpuinfo(flags), dtype, cores=2, max_mhz=5000.0, clock_source='lscpu "CPU max MHz"')
    assert (theo["isa"], theo["lanes"], theo["cores"], theo["fma_units"]) == (isa, lanes, 2, 2)
    assert theo["gflops"] == pytest.approx(2 * lanes * 2 * 2 * 5.0)  # cores x lanes x FMA units x 2 x GHz
    assert theo["clock_source"] == 'lscpu "CPU max MHz"'


def test_fma_peak_falls_back_to_cpu_mhz():
    theo = fma_peak(cpuinfo(AVX2, mhz="3000.5"), torch.float32, cores=1)
    assert theo["ghz"] == pytest.approx(3.0005) and "cpu MHz" in theo["clock_source"]
    assert theo["gflops"] == pytest.approx(1 * 8 * 2 * 2 * 3.0005)


@pytest.mark.parametrize("text", [
    cpuinfo("fpu sse2 sse4_2 avx"),        # no avx2
    cpuinfo("fpu sse2 avx avx2"),          # avx2 without fma
    cpuinfo("fpu sse2 avx fma"),           # fma without avx2
    "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n",  # aarch64: no flags line
    "",
])
def test_fma_peak_needs_avx2_and_fma(text):
    assert fma_peak(text, torch.float32, cores=2, max_mhz=3000.0) is None


def test_fma_peak_float32_float64_only():
    assert fma_peak(cpuinfo(AVX512), torch.bfloat16, cores=2) is None


def test_bench_gemm_prints_a_row(tmp_path, capsys):
    path = tmp_path / "gemm.json"
    assert bench_gemm.main(["--shapes", "2,3,8,8", "--cells", "lstm", "--repeats", "1", "--square", "16",
                            "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert cpu_model() in out.splitlines()[0]
    rate = r"(?:[\d.]+\s+\d+|n/a)"  # GFLOP/s and % of the best, or n/a
    # a [T*B, I] @ b [I, 4*H]: M=6, N=32, K=8; torch.mm always runs.
    assert re.search(rf"lstm\s+2,3,8,8\s+input proj\s+6\s+32\s+8\s+[\d.]+\s+\d+\s+{rate}\s+{rate}", out), out
    rows = json.loads(path.read_text())["rows"]
    assert [r["gemm"] for r in rows] == ["input proj", "dx", "weight grad", "recurrent", "square"]
    assert all(r["torch_mm_gflops"] > 0 for r in rows)
    assert rows[2]["a_transposed"] and (rows[2]["M"], rows[2]["N"], rows[2]["K"]) == (32, 8, 6)


def test_bench_cells_prints_a_row_per_case(capsys):
    import bench_cells
    bench_cells.main(["--cells", "lstm,rnn", "--shapes", "2,8", "--repeats", "2", "--runs", "1"])
    out = capsys.readouterr().out
    assert cpu_model() in out.splitlines()[0]
    for cell in ("LSTMCell", "RNNCell"):
        for mode in ("inference", "training"):
            assert re.search(rf"{cell}\s+{mode}\s+2\s+8\s+[\d.]+\s+[\d.]+\s+[\d.]+", out), out
