"""The fused LayerNorm LSTM/GRU kernels (fastrnn::ln_forward / ln_backward, through
fastrnn.functional.ln_layer) against the per-step reference, plus opcheck, gradcheck,
gradgradcheck, thread-count determinism, autocast, compile and argument errors.
The modules (fastrnn.LayerNormLSTM/GRU) are tested in test_layernorm.py."""
import pytest
import torch

import fastrnn.functional as F
import fastrnn.reference as R
from fastrnn import ops

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-4)}


def ln_inputs(cell, D, T, B, I, H, dtype=torch.float64, seed=0, extras=()):
    """x, h0, c0, per-direction weight tuples (as ln_layer takes them) and extra arguments
    (resets, zoneout_h/zoneout_c, rec_mask), random and away from the defaults (LN weights
    near 1, LN biases near 0), every float tensor requiring grad."""
    g = torch.Generator().manual_seed(seed)
    G = 4 if cell == "lstm" else 3

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale + shift).requires_grad_()

    def direction():
        lstm = cell == "lstm"
        return (r(G * H, I, scale=0.4), r(G * H, H, scale=0.4), r(G * H, scale=0.2),
                None if lstm else r(G * H, scale=0.2),
                r(G * H, scale=0.2, shift=1), r(G * H, scale=0.2),
                r(G * H, scale=0.2, shift=1), r(G * H, scale=0.2),
                r(H, scale=0.2, shift=1) if lstm else None, r(H, scale=0.2) if lstm else None)

    weights = [direction() for _ in range(D)]
    x = r(T, B, I)
    h0 = r(D, B, H)
    c0 = r(D, B, H) if cell == "lstm" else None
    ex = {}
    if "resets" in extras:
        ex["resets"] = torch.rand(T, B, generator=g) < 0.25
    if "zoneout" in extras:
        ex["zoneout_h"] = torch.bernoulli(torch.full((D, T, B, H), 0.3, dtype=dtype), generator=g)
        if cell == "lstm":
            ex["zoneout_c"] = torch.bernoulli(torch.full((D, T, B, H), 0.3, dtype=dtype),
                                              generator=g)
    if "rec_mask" in extras:
        ex["rec_mask"] = torch.bernoulli(torch.full((D, B, H), 0.6, dtype=dtype), generator=g) / 0.6
    return x, h0, c0, weights, ex


def leaves(x, h0, c0, weights):
    return [t for t in (x, h0, c0, *[w for ws in weights for w in ws]) if t is not None]


def outputs_and_grads(fn, cell, x, h0, c0, weights, lengths, ex):
    outs = [o for o in fn(cell, x, h0, c0, weights, lengths, **ex) if o is not None]
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return outs + list(torch.autograd.grad(loss, leaves(x, h0, c0, weights)))


# (D, T, B, I, H): one row and a hidden split (B=1, the narrow tiles), a few rows with H
# not a multiple of 16, enough rows for the row split, both directions.
SIZES = [(1, 6, 1, 5, 130), (1, 5, 3, 4, 37), (1, 5, 16, 6, 48), (2, 4, 5, 3, 64)]


def lengths_for(B, T):
    return torch.tensor([T, 0, T - 1, 1, T, 2, T, 3] * 2)[:B] if B > 1 else torch.tensor([T - 2])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_matches_reference(cell, size, dtype, with_lengths):
    D, T, B, I, H = size
    x, h0, c0, weights, ex = ln_inputs(cell, D, T, B, I, H, dtype)
    lengths = lengths_for(B, T) if with_lengths else None
    got = outputs_and_grads(F.ln_layer, cell, x, h0, c0, weights, lengths, ex)
    want = outputs_and_grads(R.ln_layer, cell, x, h0, c0, weights, lengths, ex)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("size", [(1, 1, 1, 5, 130), (2, 1, 8, 4, 37), (1, 1, 9, 3, 20)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_step_matches_reference(cell, size, dtype):
    """One step of at most 8 rows reads W_hh without packing it (row dots), 9 rows pack it:
    with lengths of 0 and 1, zoneout and recurrent dropout."""
    D, T, B, I, H = size
    x, h0, c0, weights, ex = ln_inputs(cell, D, T, B, I, H, dtype, extras=("zoneout", "rec_mask"))
    lengths = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0])[:B]
    for kw, lens in ((ex, None), ({}, lengths)):
        got = outputs_and_grads(F.ln_layer, cell, x, h0, c0, weights, lens, kw)
        want = outputs_and_grads(R.ln_layer, cell, x, h0, c0, weights, lens, kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("size", [SIZES[0], SIZES[3]])
def test_extensions_match_reference(cell, size):
    """resets, zoneout and recurrent dropout together, with lengths."""
    D, T, B, I, H = size
    x, h0, c0, weights, ex = ln_inputs(cell, D, T, B, I, H,
                                       extras=("resets", "zoneout", "rec_mask"))
    lengths = lengths_for(B, T)
    got = outputs_and_grads(F.ln_layer, cell, x, h0, c0, weights, lengths, ex)
    want = outputs_and_grads(R.ln_layer, cell, x, h0, c0, weights, lengths, ex)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_and_gradgradcheck(cell):
    def check(size, lengths, check):
        x, h0, c0, weights, _ = ln_inputs(cell, *size)

        def fn(*args):
            it = iter(args)
            x_, h0_ = next(it), next(it)
            c0_ = next(it) if c0 is not None else None
            ws = [tuple(None if w is None else next(it) for w in d) for d in weights]
            return tuple(o for o in F.ln_layer(cell, x_, h0_, c0_, ws, lengths) if o is not None)

        assert check(fn, leaves(x, h0, c0, weights))

    check((2, 4, 3, 3, 5), torch.tensor([4, 1, 3]), torch.autograd.gradcheck)
    check((1, 3, 2, 2, 3), torch.tensor([3, 2]), torch.autograd.gradgradcheck)


def op_args(cell, D=1, T=3, B=2, H=4, save=True, lengths=None):
    """Arguments of fastrnn::ln_forward, built as functional.ln_layer builds them."""
    x, h0, c0, weights, _ = ln_inputs(cell, D, T, B, 3, H)
    stack = [None if ws[0] is None else torch.stack(ws).detach().requires_grad_()
             for ws in zip(*weights)]
    _, w_hh, gx_b, b_hh, gx_w, _, ln_w, ln_b, lnc_w, lnc_b = stack
    gx = torch.randn(T, B, D * w_hh.shape[1], dtype=x.dtype, requires_grad=True)
    return (cell, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths, False,
            save, 1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("D", [1, 2])
def test_opcheck(cell, D):
    args = op_args(cell, D, lengths=torch.tensor([3, 1]))
    torch.library.opcheck(ops.ln_forward, args)
    inference = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(ops.ln_forward, inference[:14] + (False,) + inference[15:])
    out = ops.ln_forward(*args)
    y, h_n, c_n, gates, hprev, cprev, ln_rstd = (o.detach() for o in out)
    (_, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths, reverse, _,
     _) = args
    bargs = (cell, torch.randn_like(y), torch.randn_like(h_n),
             torch.randn_like(c_n) if cell == "lstm" else None, gx.detach(), gx_w.detach(),
             gx_b.detach(), w_hh.detach(), None if b_hh is None else b_hh.detach(),
             ln_w.detach(), ln_b.detach(), None if lnc_w is None else lnc_w.detach(),
             None if lnc_b is None else lnc_b.detach(), lengths, gates, hprev, cprev, ln_rstd,
             reverse)
    torch.library.opcheck(ops.ln_backward, bargs)


def test_mm_is_differentiable():
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.mm, (a, b))
    assert torch.autograd.gradgradcheck(ops.mm, (a, b))
    torch.library.opcheck(ops.mm, (a, b))


@pytest.mark.parametrize("B", [1, 3, 32])
def test_bitwise_across_thread_counts(B):
    """1 and 2 threads give the same bits: every row statistic is merged from 16-unit
    blocks in block order, whichever thread computed each block (B=1, 3: hidden split over
    the threads; B=32: each thread its own rows)."""
    saved = torch.get_num_threads()
    try:
        for cell in ("lstm", "gru"):
            for dtype in (torch.float32, torch.float64):
                runs = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    args = ln_inputs(cell, 1, 6, B, 8, 96, dtype)
                    runs.append(outputs_and_grads(F.ln_layer, cell, *args[:4], None, args[4]))
                for a, b in zip(*runs):
                    assert torch.equal(a, b), (cell, dtype)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_autocast(cell):
    """Under CPU autocast the recurrence runs in float32 and y, h_n, c_n come back in
    bfloat16, as for the plain cells."""
    x, h0, c0, weights, _ = ln_inputs(cell, 1, 5, 3, 4, 16, torch.float32)
    want = F.ln_layer(cell, x, h0, c0, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = F.ln_layer(cell, x, h0, c0, weights)
    for a, b in zip(got, want):
        if b is not None:
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b, atol=0.05, rtol=0.05)
    got[0].float().sum().backward()
    assert all(w.grad is not None for w in weights[0] if w is not None)


def test_compile_fullgraph():
    cell = "lstm"
    x, h0, c0, weights, _ = ln_inputs(cell, 2, 4, 3, 3, 8, torch.float32)
    lengths = torch.tensor([4, 2, 3])

    def fn(x, h0, c0):
        return F.ln_layer(cell, x, h0, c0, weights, lengths)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(x, h0, c0), fn(x, h0, c0)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change, error, match", [
    (dict(cell="rnn_tanh"), RuntimeError, "LayerNorm cells are 'lstm' and 'gru'"),
    (dict(eps=0.0), RuntimeError, "eps must be positive"),
    (dict(gx=torch.randn(3, 2, 7, dtype=torch.float64)), RuntimeError, "gx must have shape"),
    (dict(lnc_w=None), RuntimeError, "lnc_w is needed by cell 'lstm'"),
    (dict(ln_w=torch.randn(1, 5, dtype=torch.float64)), RuntimeError, "ln_w must have shape"),
    (dict(h0=torch.randn(1, 2, 4)), RuntimeError, "h0 has dtype"),
])
def test_bad_arguments(change, error, match):
    names = ["cell", "gx", "h0", "c0", "w_hh", "b_hh", "ln_w", "ln_b", "lnc_w", "lnc_b", "gx_w",
             "gx_b", "lengths", "reverse", "save", "eps"]
    args = dict(zip(names, op_args("lstm")))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.ln_forward(*args.values())


def test_gru_rejects_lstm_only_arguments():
    args = list(op_args("gru"))
    args[8] = torch.ones(1, 4, dtype=torch.float64)  # lnc_w
    with pytest.raises(RuntimeError, match="lnc_w is only used by cell 'lstm'"):
        ops.ln_forward(*args)

# On CUDA: tests/test_cuda.py (test_ln_*), against these CPU kernels.
