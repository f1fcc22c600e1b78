"""fastrnn.functional against the per-step reference and against torch.nn."""
import math

import pytest
import torch

import fastrnn
from fastrnn import functional as F
from fastrnn import ops
from fastrnn import reference as R

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# (T, B, I, H): from the smallest case up to layers big enough for several threads, both
# splitting the batch rows (B=16) and splitting the hidden units (B=3, H not a multiple of 16).
SIZES = [(1, 1, 1, 1), (5, 3, 4, 6), (9, 16, 20, 100), (64, 16, 32, 128), (33, 3, 24, 130)]
TOL64 = dict(atol=1e-10, rtol=0)


def make_inputs(cell, T, B, I, H, dtype=torch.float64, bias=True, proj=0, seed=0):
    """Random inputs with torch.nn's initialisation scale; every tensor requires grad."""
    g = torch.Generator().manual_seed(seed)
    k = 1 / math.sqrt(H)
    P = proj or H
    G = GATES[cell]

    def u(*shape):
        return ((torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1) * k).requires_grad_()

    def n(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    return dict(
        x=n(T, B, I), h0=n(B, P), c0=n(B, H) if cell == "lstm" else None,
        w_ih=u(G * H, I), w_hh=u(G * H, P),
        b_ih=u(G * H) if bias else None, b_hh=u(G * H) if bias else None,
        w_hr=u(P, H) if proj else None,
    )


# (T, B, I, H) for the extensions' kernel tests: tiny, one thread; hidden split over
# threads (B=3); row split (B=17).
EXTENSION_SIZES = [(1, 1, 1, 1), (7, 3, 4, 6), (12, 3, 24, 130), (11, 17, 8, 40)]


def call(impl, cell, inp, lengths=None, reverse=False, **extras):
    """Run fastrnn.functional or fastrnn.reference with the arguments of `cell`; extras
    (resets, zoneout_h, zoneout_c, rec_mask) are passed where given."""
    common = (inp["w_ih"], inp["w_hh"], inp["b_ih"], inp["b_hh"])
    kw = dict(lengths=lengths, reverse=reverse, **{k: v for k, v in extras.items() if v is not None})
    if cell == "lstm":
        if inp["w_hr"] is not None:
            kw["w_hr"] = inp["w_hr"]
        return impl.lstm(inp["x"], inp["h0"], inp["c0"], *common, **kw)
    if cell == "gru":
        return impl.gru(inp["x"], inp["h0"], *common, **kw)
    return impl.rnn(inp["x"], inp["h0"], *common, nonlinearity=cell[4:], **kw)


def check_parity(cell, inp, tol, lengths=None, reverse=False, **extras):
    """fastrnn.functional against fastrnn.reference: every output and every gradient."""
    outs = call(F, cell, inp, lengths, reverse, **extras)
    refs = call(R, cell, inp, lengths, reverse, **extras)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **tol)
    for (k, g), (_, gr) in zip(grads(outs, inp).items(), grads(refs, inp).items()):
        torch.testing.assert_close(g, gr, **tol, msg=lambda m: f"grad of {k}: {m}")


def leaves(inp):
    return {k: v for k, v in inp.items() if v is not None}


def grads(outs, inp, seed=1):
    """Gradients of a random linear function of every output w.r.t. every input."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
               for o in outs)
    names = list(leaves(inp))
    gs = torch.autograd.grad(loss, [inp[k] for k in names], allow_unused=True)
    # The reference leaves inputs of empty computations out of the graph: their gradient is 0.
    return {k: torch.zeros_like(inp[k]) if g is None else g for k, g in zip(names, gs)}


def lengths_for(kind, T, B):
    if kind == "none":
        return None
    if kind == "full":
        return torch.full((B,), T, dtype=torch.int64)
    g = torch.Generator().manual_seed(T * 100 + B)
    lens = torch.randint(0, T + 1, (B,), generator=g)
    lens[0] = T  # unsorted, with the extremes present when B allows
    if B > 1:
        lens[-1] = 0
    return lens


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("lengths", ["none", "full", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_fp64(cell, bias, reverse, lengths, size):
    inp = make_inputs(cell, *size, bias=bias)
    lens = lengths_for(lengths, size[0], size[1])
    out = call(F, cell, inp, lens, reverse)
    ref = call(R, cell, inp, lens, reverse)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **TOL64)
    ga, gb = grads(out, inp), grads(ref, inp)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("size", [(5, 3, 4, 6), (64, 16, 32, 128)], ids=["small", "large"])
def test_lstm_projection_matches_reference(size, reverse, lengths):
    T, B, I, H = size
    inp = make_inputs("lstm", *size, proj=H // 2)
    lens = lengths_for(lengths, T, B)
    out = call(F, "lstm", inp, lens, reverse)
    ref = call(R, "lstm", inp, lens, reverse)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **TOL64)
    ga, gb = grads(out, inp), grads(ref, inp)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_fp32(cell, size, reverse):
    """float32 kernels (vectorised activations) against the exact result: the fp64
    reference on the same fp32-representable inputs.

    Outputs and input/state gradients: torch's default float32 assert_close. Parameter
    gradients are sums over all T*B steps, where summation order alone moves single
    elements past that elementwise bound (torch's own fp32 loop misses it too at T=64,
    B=16), so they get a norm-wise bound of 1e-6 (about 8 fp32 ulps); torch's fp32 loop
    sits at 2e-7 there and fastrnn within about 2x of it.
    """
    inp64 = {k: (v.detach().float().double().requires_grad_() if v is not None else None)
             for k, v in make_inputs(cell, *size).items()}
    inp = {k: (v.detach().float().requires_grad_() if v is not None else None)
           for k, v in inp64.items()}
    lens = lengths_for("mixed", size[0], size[1])
    out = call(F, cell, inp, lens, reverse)
    ref = call(R, cell, inp64, lens, reverse)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r.float())
    ga, gb = grads(out, inp), grads(ref, inp64)
    for name in ga:
        if name.startswith(("w_", "b_")):
            err = (ga[name].double() - gb[name]).norm() / gb[name].norm().clamp_min(1e-30)
            assert err <= 1e-6, f"{name}: norm-wise relative error {err:.2e}"
        else:
            torch.testing.assert_close(ga[name], gb[name].float(), msg=lambda m: f"{name}: {m}")


# ---- against torch.nn -----------------------------------------------------------------

def torch_module(cell, inp):
    """A one-layer torch.nn module holding the same weights as `inp`."""
    I, H = inp["x"].shape[2], inp["w_hh"].shape[0] // GATES[cell]
    bias = inp["b_ih"] is not None
    if cell == "lstm":
        proj = inp["w_hr"].shape[0] if inp["w_hr"] is not None else 0
        mod = torch.nn.LSTM(I, H, bias=bias, proj_size=proj)
    elif cell == "gru":
        mod = torch.nn.GRU(I, H, bias=bias)
    else:
        mod = torch.nn.RNN(I, H, bias=bias, nonlinearity=cell[4:])
    mod = mod.to(inp["x"].dtype)
    with torch.no_grad():
        for name, key in [("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"),
                          ("bias_ih_l0", "b_ih"), ("bias_hh_l0", "b_hh"), ("weight_hr_l0", "w_hr")]:
            if hasattr(mod, name):
                getattr(mod, name).copy_(inp[key])
    return mod


def torch_run(cell, mod, x, h0, c0, lengths, reverse):
    """torch.nn on each sequence's unpadded prefix (flipped for reverse), re-padded."""
    T, B = x.shape[:2]
    lens = lengths.tolist() if lengths is not None else [T] * B
    ys, hs, cs = [], [], []
    for b, n in enumerate(lens):
        xb = x[:n, b:b + 1]
        if reverse:
            xb = xb.flip(0)
        hx = (h0[b:b + 1].unsqueeze(0), c0[b:b + 1].unsqueeze(0)) if cell == "lstm" \
            else h0[b:b + 1].unsqueeze(0)
        if n == 0:
            yb, hb = xb.new_zeros(0, 1, h0.shape[1]), hx
        else:
            yb, hb = mod(xb, hx)
        if reverse:
            yb = yb.flip(0)
        ys.append(torch.cat([yb, yb.new_zeros(T - n, 1, yb.shape[2])]))
        h, c = hb if cell == "lstm" else (hb, None)
        hs.append(h[0])
        if c is not None:
            cs.append(c[0])
    out = [torch.cat(ys, 1), torch.cat(hs)]
    return out + ([torch.cat(cs)] if cell == "lstm" else [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell, proj", [(c, 0) for c in CELLS] + [("lstm", 3)],
                         ids=CELLS + ["lstm_proj"])
def test_matches_torch_nn(cell, proj, bias, reverse, lengths, dtype):
    T, B, I, H = 12, 6, 5, 7
    inp64 = make_inputs(cell, T, B, I, H, bias=bias, proj=proj)
    inp = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None)
           for k, v in inp64.items()}
    lens = lengths_for(lengths, T, B)
    mod = torch_module(cell, inp)
    out = call(F, cell, inp, lens, reverse)
    ref = torch_run(cell, mod, inp["x"], inp["h0"], inp["c0"], lens, reverse)
    tol = dict(atol=5e-5, rtol=0) if dtype == torch.float64 else {}
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **tol)
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(o.shape, generator=g, dtype=dtype) for o in out]
    ours = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, ws)),
                               [inp["x"], inp["h0"]] + ([inp["c0"]] if cell == "lstm" else [])
                               + [inp["w_ih"], inp["w_hh"]])
    theirs_in = [inp["x"], inp["h0"]] + ([inp["c0"]] if cell == "lstm" else [])
    theirs = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, ws)),
                                 theirs_in + [mod.weight_ih_l0, mod.weight_hh_l0])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)


# ---- gradcheck and opcheck ------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [4, 0, 2]], ids=["nolen", "len"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_gradcheck(cell, lengths, reverse):
    proj = 2 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    inp = make_inputs(cell, 4, 3, 3, 4, proj=proj)
    names = list(leaves(inp))
    lens = torch.tensor(lengths) if lengths else None

    def fn(*args):
        return call(F, cell, dict(inp, **dict(zip(names, args))), lens, reverse)

    assert torch.autograd.gradcheck(fn, [inp[k] for k in names])


def op_args(cell, D=1, lengths=None, reverse=False, save=True, proj=0, T=3, B=3, I=2, H=4):
    """Arguments of torch.ops.fastrnn.forward for D stacked directions."""
    dirs = [make_inputs(cell, T, B, I, H, proj=proj, seed=d) for d in range(D)]
    dirs[0]["x"] = dirs[0]["x"].detach().requires_grad_()

    def stack(key):
        parts = [d[key] for d in dirs]
        return None if parts[0] is None else torch.stack([p.detach() for p in parts]).requires_grad_()

    return (cell, dirs[0]["x"], stack("h0"), stack("c0"), stack("w_ih"), stack("w_hh"),
            stack("b_ih"), stack("b_hh"), stack("w_hr"), lengths, reverse, save)


def op_samples():
    for cell in CELLS:
        for proj in ([0, 2] if cell == "lstm" else [0]):
            for lens in [None, torch.tensor([3, 0, 1])]:
                for D, reverse in [(1, False), (1, True), (2, False)]:
                    yield op_args(cell, D, lens, reverse, proj=proj)


@pytest.mark.parametrize("args", list(op_samples()),
                         ids=lambda a: f"{a[0]}-D{a[5].shape[0]}-{'proj' if a[8] is not None else 'noproj'}"
                                       f"-{'len' if a[9] is not None else 'nolen'}-{'rev' if a[10] else 'fwd'}")
def test_opcheck_forward(args):
    torch.library.opcheck(ops.forward, args)


def opcheck_backward_of(args):
    """opcheck of fastrnn::backward on what fastrnn::forward(*args) saved, with the same
    weights, lengths, direction and extras (resets, zoneout, rec_mask: args[12:])."""
    cell, reverse = args[0], args[10]
    with torch.no_grad():
        y, h_n, c_n, gates, hprev, cprev, m = ops.forward(*args)
    dc = torch.randn_like(c_n) if cell == "lstm" else None
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    bargs = (cell, torch.randn_like(y), torch.randn_like(h_n), dc, detach(args[1]),
             detach(args[4]), detach(args[5]), detach(args[8]), args[9], gates, hprev, cprev,
             m, reverse, True, *args[12:])
    torch.library.opcheck(ops.backward, bargs)


def opcheck_backward(cell, D, device="cpu"):
    """opcheck of fastrnn::backward on what a real forward saved (also used on CUDA)."""
    lens = torch.tensor([3, 1, 2], device=device)
    opcheck_backward_of(tuple(a.to(device) if isinstance(a, torch.Tensor) else a
                              for a in op_args(cell, D, lens)))


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_backward(cell, D):
    opcheck_backward(cell, D)


@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("cell, proj", [(c, 0) for c in CELLS] + [("lstm", 3)],
                         ids=CELLS + ["lstm_proj"])
def test_bidirectional_layer_equals_two_directions(cell, proj, lengths):
    """F.layer runs both directions at once; each must equal its own one-direction run."""
    T, B, I, H = 9, 16, 5, 40  # several threads per direction on most machines
    fwd, bwd = (make_inputs(cell, T, B, I, H, proj=proj, seed=s) for s in (1, 2))
    bwd["x"] = fwd["x"]
    lens = lengths_for(lengths, T, B)
    keys = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    c0 = torch.stack([fwd["c0"], bwd["c0"]]) if cell == "lstm" else None
    y, h_n, c_n = F.layer(cell, fwd["x"], torch.stack([fwd["h0"], bwd["h0"]]), c0,
                          [tuple(d[k] for k in keys) for d in (fwd, bwd)], lens)
    ref_f = call(R, cell, fwd, lens, reverse=False)
    ref_b = call(R, cell, bwd, lens, reverse=True)
    torch.testing.assert_close(y, torch.cat([ref_f[0], ref_b[0]], 2), **TOL64)
    torch.testing.assert_close(h_n, torch.stack([ref_f[1], ref_b[1]]), **TOL64)
    if cell == "lstm":
        torch.testing.assert_close(c_n, torch.stack([ref_f[2], ref_b[2]]), **TOL64)
    outs = [y, h_n] + ([c_n] if cell == "lstm" else [])
    refs = [torch.cat([ref_f[0], ref_b[0]], 2), torch.stack([ref_f[1], ref_b[1]])] + \
        ([torch.stack([ref_f[2], ref_b[2]])] if cell == "lstm" else [])
    both = {**{k + "_f": v for k, v in leaves(fwd).items()},
            **{k + "_b": v for k, v in leaves(bwd).items() if k != "x"}}
    ga, gb = grads(outs, both), grads(refs, both)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B", [1, 3, 8, 9])
@pytest.mark.parametrize("H", [6, 130])
@pytest.mark.parametrize("cell, proj", [(c, 0) for c in CELLS] + [("lstm", 3)],
                         ids=CELLS + ["lstm_proj"])
def test_one_step_matches_reference(cell, proj, H, B):
    """One step of at most 8 rows (a cell call) reads W_hh and W_ih where they lie, without
    packing them (row dots); 9 rows pack them. Both against the reference, values and
    gradients, with lengths of 0 and 1, in both directions, with zoneout and recurrent
    dropout."""
    inp = make_inputs(cell, 1, B, 5, H, proj=proj, seed=B + H)
    P = proj or H
    g = torch.Generator().manual_seed(B)
    lens = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0])[:B]

    def bernoulli(p, *shape):
        return torch.bernoulli(torch.full(shape, p, dtype=torch.float64), generator=g)

    extras = dict(rec_mask=bernoulli(0.7, B, P) / 0.7, zoneout_h=bernoulli(0.3, 1, B, P),
                  zoneout_c=bernoulli(0.3, 1, B, H) if cell == "lstm" else None)
    for reverse in (False, True):
        check_parity(cell, inp, TOL64, lens, reverse)
        check_parity(cell, inp, TOL64, None, reverse, **extras)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_one_step_bits_across_thread_counts(cell, dtype):
    """A one-step call of a few rows splits the hidden units of its row dots over the
    threads, never a sum: 1 and 2 threads give the same bits, values and gradients."""
    inp = make_inputs(cell, 1, 3, 200, 130, dtype=dtype, seed=5)
    saved = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs = [o for o in call(F, cell, inp) if o is not None]
            runs.append(outs + list(grads(outs, inp).values()))
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- behaviour ------------------------------------------------------------------------

def test_inference_saves_nothing():
    args = op_args("lstm", save=None)
    with torch.no_grad():
        out = ops.forward(*args[:-1], F._save(*args[1:9]))
    assert all(t.numel() == 0 for t in out[3:])
    out = ops.forward(*args[:-1], F._save(*args[1:9]))
    assert all(t.numel() > 0 for t in out[3:6])  # gates, hprev, cprev (m only with w_hr)


@pytest.mark.parametrize("cell", CELLS)
def test_every_output_element_written(cell):
    """Fresh allocations are NaN-poisoned; no NaN may survive into outputs or gradients."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        for reverse in (False, True):
            inp = make_inputs(cell, 6, 5, 3, 20, proj=0)
            out = call(F, cell, inp, torch.tensor([6, 0, 2, 5, 1]), reverse)
            assert all(torch.isfinite(o).all() for o in out)
            assert all(torch.isfinite(g).all() for g in grads(out, inp).values())
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("cell", CELLS)
def test_padded_positions(cell):
    T, B = 7, 4
    inp = make_inputs(cell, T, B, 3, 5)
    lens = torch.tensor([2, 7, 0, 4])
    out = call(F, cell, inp, lens, reverse=False)
    y = out[0]
    mask = torch.arange(T)[:, None] >= lens[None, :]
    assert (y[mask] == 0).all()
    gx = grads(out, inp)["x"]
    assert (gx[mask] == 0).all()
    # A zero length returns the initial state.
    assert torch.equal(out[1][2], inp["h0"][2])
    if cell == "lstm":
        assert torch.equal(out[2][2], inp["c0"][2])


@pytest.mark.parametrize("cell", CELLS)
def test_full_lengths_equal_no_lengths(cell):
    inp = make_inputs(cell, 6, 3, 3, 5)
    for reverse in (False, True):
        a = call(F, cell, inp, None, reverse)
        b = call(F, cell, inp, torch.full((3,), 6), reverse)
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@pytest.mark.parametrize("cell", CELLS)
def test_only_some_outputs_used(cell):
    """Gradients flowing into only h_n (or only y, or only c_n) are all counted."""
    inp = make_inputs(cell, 5, 3, 2, 4)
    lens = torch.tensor([5, 2, 3])
    out, ref = call(F, cell, inp, lens), call(R, cell, inp, lens)
    for k in range(len(out)):
        ga = torch.autograd.grad(out[k].sum(), list(leaves(inp).values()), retain_graph=True)
        gb = torch.autograd.grad(ref[k].sum(), list(leaves(inp).values()), retain_graph=True)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch_and_sequence(cell):
    for T, B in [(4, 0), (0, 3)]:
        inp = make_inputs(cell, T, B, 3, 5)
        out = call(F, cell, inp)
        ref = call(R, cell, inp)
        for o, r in zip(out, ref):
            assert o.shape == r.shape
            torch.testing.assert_close(o, r)
        ga = grads(out, inp)
        gb = grads(ref, inp)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_inputs(cell):
    inp = make_inputs(cell, 5, 3, 4, 6)
    nc = {}
    for k, v in inp.items():
        if v is None:
            nc[k] = None
        elif v.dim() == 2:
            nc[k] = v.detach().t().contiguous().t().requires_grad_()
        elif v.dim() == 3:
            nc[k] = v.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        else:
            nc[k] = torch.stack([v.detach(), v.detach()], 1)[:, 0].requires_grad_()
    assert not nc["x"].is_contiguous() and not nc["w_hh"].is_contiguous()
    out, ref = call(F, cell, nc), call(R, cell, inp)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **TOL64)
    ga, gb = grads(out, nc), grads(ref, inp)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL64)


# ---- bad input --------------------------------------------------------------------------

def bad(cell="lstm", **over):
    inp = {k: (v.detach() if v is not None else None)
           for k, v in make_inputs(cell, 5, 3, 4, 6).items()}
    lengths = over.pop("lengths", None)
    inp.update(over)
    return lambda: call(F, cell, inp, lengths)


@pytest.mark.parametrize("case, match", [
    (dict(x=torch.randn(5, 4, dtype=torch.float64)), "x must be 3-D"),
    (dict(x=torch.randn(5, 3, 7, dtype=torch.float64)), "w_ih must have shape"),
    (dict(h0=torch.randn(3, 7, dtype=torch.float64)), "h0 must have shape"),
    (dict(h0=torch.randn(1, 3, 6, dtype=torch.float64)), "h0 must be 2-D"),
    (dict(c0=torch.randn(2, 6, dtype=torch.float64)), "c0 must have shape"),
    (dict(w_hh=torch.randn(24, 5, dtype=torch.float64)), "w_hh must have shape"),
    (dict(w_hh=torch.randn(22, 6, dtype=torch.float64)), "not a positive multiple of 4"),
    (dict(b_ih=torch.randn(23, dtype=torch.float64)), "b_ih must have shape"),
    (dict(h0=torch.randn(3, 6)), "h0 has dtype Float but input x has dtype Double"),
    (dict(w_ih=torch.randn(24, 4)), "w_ih has dtype Float"),
    (dict(h0=torch.randn(3, 6, dtype=torch.float64, device="meta")), "h0 is on meta"),
    (dict(x=torch.randn(5, 3, 4, dtype=torch.float16), h0=torch.randn(3, 6, dtype=torch.float16)),
     "c0 has dtype Double but input x has dtype Half"),
    (dict(lengths=torch.tensor([1, 2])), r"lengths must have shape \[3\]"),
    (dict(lengths=torch.tensor([1, -2, 3])), "lengths must be non-negative"),
    (dict(lengths=torch.tensor([1, 6, 3])), "must not exceed the sequence length 5"),
    (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths must be an integer tensor"),
])
def test_bad_input_errors(case, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        bad(**case)()


def test_unknown_nonlinearity():
    inp = make_inputs("rnn_tanh", 3, 2, 2, 3)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        F.rnn(inp["x"], inp["h0"], inp["w_ih"], inp["w_hh"], None, None, nonlinearity="sigmoid")
    with pytest.raises(RuntimeError, match="unknown cell 'rnn_sigmoid'"):
        ops.forward("rnn_sigmoid", *op_args("rnn_tanh")[1:-1], False)


def test_backward_without_saved_state_is_an_error():
    args = op_args("gru", save=False)
    with torch.no_grad():
        y, h_n, _, gates, hprev, cprev, m = ops.forward(*args)
    with pytest.raises(RuntimeError, match="forward ran with save=False"):
        ops.backward("gru", y, h_n, None, args[1].detach(), args[4].detach(), args[5].detach(),
                     None, None, gates, hprev, cprev, m, False, True)


@pytest.mark.parametrize("cell", CELLS)
def test_inference_mode_and_training_calls_interleave(cell):
    """Calls under torch.inference_mode and normal calls share per-thread scratch memory
    (for the input projection and the gate gradients); neither mode may leak into the other,
    with lengths (the padded-row path) and without."""
    inp = make_inputs(cell, 6, 5, 4, 24, dtype=torch.float32)
    lens = torch.tensor([6, 2, 0, 5, 1])
    ref = [o.detach() for o in call(F, cell, inp, lens) if o is not None]
    for _ in range(2):
        with torch.inference_mode():
            got = [o for o in call(F, cell, inp, lens) if o is not None]
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        outs = [o for o in call(F, cell, inp, lens) if o is not None]
        sum(o.sum() for o in outs).backward()
        assert all(torch.equal(a.detach(), b) for a, b in zip(outs, ref))


def backward_args(cell="lstm", **change):
    """Arguments of a valid fastrnn::backward call on what a real forward saved, with
    `change` applied (names as in the schema)."""
    lens = torch.tensor([3, 1, 2])
    args = op_args(cell, 1, lens)
    with torch.no_grad():
        y, h_n, c_n, gates, hprev, cprev, m = ops.forward(*args)
    a = dict(cell=cell, dy=torch.randn_like(y), dh_n=torch.randn_like(h_n),
             dc_n=torch.randn_like(c_n) if cell == "lstm" else None, x=args[1].detach(),
             w_ih=args[4].detach(), w_hh=args[5].detach(), w_hr=None, lengths=lens, gates=gates,
             hprev=hprev, cprev=cprev, m=m, reverse=False, input_grad=True)
    a.update(change)
    return list(a.values())


@pytest.mark.parametrize("cell, change, match", [
    ("lstm", dict(dy=torch.randn(3, 3, 5, dtype=torch.float64)), r"dy must have shape \[3, 3, 4\]"),
    ("lstm", dict(dy=torch.randn(3, 3, 4)), "dy has dtype Float but input x has dtype Double"),
    ("lstm", dict(dh_n=torch.randn(1, 2, 4, dtype=torch.float64)), "dh_n must have shape"),
    ("lstm", dict(dc_n=torch.randn(2, 3, 4, dtype=torch.float64)), "dc_n must have shape"),
    ("gru", dict(dc_n=torch.randn(1, 3, 4, dtype=torch.float64)), "dc_n is only used by cell 'lstm'"),
    ("gru", dict(lengths=torch.tensor([3, 1, 2], dtype=torch.int32)), "lengths must be int64"),
    ("gru", dict(lengths=torch.tensor([3, 1])), r"lengths must have shape \[3\]"),
    ("gru", dict(lengths=torch.tensor([3, 1, 4])), "must not exceed the sequence length 3"),
    ("rnn_tanh", dict(hprev=torch.randn(1, 9, 4, dtype=torch.float64)), "hprev must have shape"),
])
def test_backward_bad_input_errors(cell, change, match):
    """A direct fastrnn::backward call is checked like forward: every tensor a kernel reads
    gets its shape, dtype and device checked first (never a read out of bounds)."""
    with pytest.raises(RuntimeError, match=match):
        ops.backward(*backward_args(cell, **change))
    ops.backward(*backward_args(cell))  # the unchanged call is fine
