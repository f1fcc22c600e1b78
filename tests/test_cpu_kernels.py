"""The CPU kernels of every instruction set this machine runs (AVX-512, AVX2, portable):
the same parity with the per-step reference, and fastrnn's own GEMM against torch.mm.

The best instruction set is picked from the CPU's feature flags; these tests switch to
each supported one in turn (fastrnn.ops._C.set_cpu_kernels) so that a machine with
AVX-512 also checks the AVX2 and portable paths.
"""
import pytest
import torch

from fastrnn import ops

from test_functional import CELLS, call, grads, lengths_for, make_inputs
from fastrnn import functional as F
from fastrnn import reference as R

ISAS = ops._C.supported_cpu_kernels()
TOL64 = dict(atol=1e-10, rtol=0)


@pytest.fixture(params=ISAS)
def isa(request):
    best = ops._C.cpu_kernels()
    assert ops._C.set_cpu_kernels(request.param)
    yield request.param
    ops._C.set_cpu_kernels(best)


def test_best_instruction_set_is_the_default():
    assert ISAS and ISAS[-1] == "portable"
    assert ops._C.cpu_kernels() == ISAS[0]
    assert not ops._C.set_cpu_kernels("no-such-isa")
    assert ops._C.cpu_kernels() == ISAS[0]


# Sizes that hit every tile edge: units not a multiple of the vector width, rows not a
# multiple of the tile height, one row, several K blocks (H > 256), both thread plans.
SIZES = [(3, 1, 5, 7), (4, 5, 9, 37), (6, 13, 16, 48), (5, 3, 300, 270), (4, 33, 20, 64)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_matches_reference(isa, cell, size):
    proj = 5 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    T, B = size[0], size[1]
    for lengths, reverse in [("none", False), ("mixed", True)]:
        inp = make_inputs(cell, *size, proj=proj)
        lens = lengths_for(lengths, T, B)
        out = call(F, cell, inp, lens, reverse)
        ref = call(R, cell, inp, lens, reverse)
        for a, e in zip(out, ref):
            if e is not None:
                torch.testing.assert_close(a, e, **TOL64)
        ga, ge = grads(out, inp), grads(ref, inp)
        for k in ga:
            torch.testing.assert_close(ga[k], ge[k], **TOL64, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_float32_matches_reference(isa, cell):
    inp = make_inputs(cell, 7, 10, 24, 40, dtype=torch.float32)
    out = call(F, cell, inp)
    ref = call(R, cell, {k: None if v is None else v.double() for k, v in inp.items()})
    for a, e in zip(out, ref):
        if e is not None:
            torch.testing.assert_close(a.double(), e, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 5, 3), (13, 300, 50), (64, 33, 97),
                                   (600, 70, 130), (3, 0, 4), (40, 520, 256), (300, 90, 8),
                                   (257, 40, 1), (0, 5, 3)])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
def test_mm_matches_torch(isa, dtype, M, K, N, layout):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a = torch.randn(M, K, generator=g, dtype=dtype)
    b = torch.randn(K, N, generator=g, dtype=dtype)
    if layout[0] == "t":  # a transposed view: A[m, k] with unit stride along m
        a = a.t().contiguous().t()
    if layout[1] == "t":
        b = b.t().contiguous().t()
    out = torch.ops.fastrnn.mm(a, b)
    assert out.shape == (M, N) and out.is_contiguous()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, a @ b, **tol)


@pytest.mark.parametrize("N", [90, 8])  # 8: the one-vector tile
def test_mm_is_bitwise_stable_across_thread_counts(N):
    a, b = torch.randn(300, 700), torch.randn(700, N)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastrnn.mm(a, b)
        torch.set_num_threads(2)
        two = torch.ops.fastrnn.mm(a, b)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)


@pytest.mark.parametrize("N", [1, 5, 15])
def test_narrow_mm_has_the_bits_of_a_wide_one(isa, N):
    """A product at most one vector wide takes a one-vector tile; each value is the same sum
    in the same order as in a wide product's column, and as in its transpose (of more than
    ROW_DOT_ROWS rows; fewer take the row dots below)."""
    a, b = torch.randn(200, 300), torch.randn(300, N)
    wide = torch.ops.fastrnn.mm(a, torch.cat([b, torch.randn(300, 40)], 1))[:, :N]
    assert torch.equal(torch.ops.fastrnn.mm(a, b), wide)
    if N > ROW_DOT_ROWS:
        assert torch.equal(torch.ops.fastrnn.mm(a, b), torch.ops.fastrnn.mm(b.t(), a.t()).t())


ROW_DOT_ROWS = 8  # gemm.h's kRowDotRows
IN_PLACE_ROWS = 32  # gemm.h's kInPlaceRows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [150, 600, 1100])  # more than one K block from 600 on
@pytest.mark.parametrize("N", [1, 37, 300])
def test_few_rows_read_b_in_place_with_the_bits_of_the_packed_product(isa, dtype, K, N):
    """At most IN_PLACE_ROWS rows times a row-major B (dx = dgates W_ih of a few rows) read
    B where it lies instead of packing it, with each value summed as the packed GEMM sums
    it."""
    a, b = torch.randn(IN_PLACE_ROWS + 8, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
    full = torch.ops.fastrnn.mm(a, b)  # more rows than IN_PLACE_ROWS: B packed
    for rows in (slice(0, 1), slice(3, 7), slice(5, 5 + ROW_DOT_ROWS + 3),
                 slice(8, 8 + IN_PLACE_ROWS)):
        assert torch.equal(torch.ops.fastrnn.mm(a[rows], b), full[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 7, 16, 300])
def test_row_dots_bits_depend_on_k_alone(isa, dtype, K):
    """x W^T for at most ROW_DOT_ROWS rows reads W unpacked and sums each value in vector
    lanes: its bits must not depend on the thread count, on the other rows of x, or on the
    other rows of W (a split of N), and they match torch within the dtype's tolerance."""
    x, w = torch.randn(ROW_DOT_ROWS, K, dtype=dtype), torch.randn(100, K, dtype=dtype)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastrnn.mm(x, w.t())
        torch.set_num_threads(2)
        two = torch.ops.fastrnn.mm(x, w.t())
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)
    assert torch.equal(torch.ops.fastrnn.mm(x[3:4], w.t()), one[3:4])
    assert torch.equal(torch.ops.fastrnn.mm(x[2:5], w[17:70].t()), one[2:5, 17:70])
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(one, x @ w.t(), **tol)


def test_mm_errors():
    with pytest.raises(RuntimeError, match="expected 2-D"):
        torch.ops.fastrnn.mm(torch.randn(2, 3, 4), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        torch.ops.fastrnn.mm(torch.randn(2, 3), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.fastrnn.mm(torch.randn(2, 3), torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        torch.ops.fastrnn.mm(torch.randn(2, 3).half(), torch.randn(3, 2).half())


def test_opcheck_mm():
    torch.library.opcheck(torch.ops.fastrnn.mm.default, (torch.randn(5, 4), torch.randn(4, 3)))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_tanh", "RNN_relu"])
def test_nan_propagates_as_in_torch_nn(isa, kind):
    """A NaN in the input reaches the same outputs as in torch.nn: the vector exp/tanh
    clamps and the ReLU must not turn it into a number."""
    torch.manual_seed(0)
    name, nl = (kind.split("_") + [None])[:2]
    extra = {"nonlinearity": nl} if nl else {}
    ref = getattr(torch.nn, name)(6, 40, **extra)
    fast = getattr(__import__("fastrnn"), name)(6, 40, **extra)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6)
    x[2, 1, 4] = float("nan")
    (ya, ha), (ye, he) = fast(x), ref(x)
    torch.testing.assert_close(ya, ye, equal_nan=True, atol=1e-5, rtol=1e-4)
    assert torch.equal(ya.isnan(), ye.isnan()) and ya.isnan().any()


@pytest.mark.parametrize("f64", [False, True])
def test_fma_peak_measures_a_positive_rate(isa, f64):
    # The benchmark's multiply-add limit: a rate, and one that more lanes do not lower
    # (float32 lanes are twice float64's on every instruction set).
    rate = ops._C.fma_peak(f64, 1, 0.02)
    assert 0 < rate < 1e5
    if f64:
        assert ops._C.fma_peak(False, 1, 0.02) > 1.2 * rate
