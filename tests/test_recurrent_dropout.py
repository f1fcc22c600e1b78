"""Recurrent dropout (``recurrent_dropout=p``, variational): the fused kernels against the
reference for any mask on the h feeding W_hh, the modules' masks, gradients, ops and
argument errors."""
import pytest
import torch

import fastrnn
from fastrnn import functional as F
from fastrnn import ops
from fastrnn import reference as R

from test_functional import (CELLS, EXTENSION_SIZES as SIZES, call, check_parity, leaves,
                             lengths_for, make_inputs, op_args, opcheck_backward_of)
from test_zoneout import KINDS, module, zoneout_for


def mask_for(inp, kind, seed):
    """[B, P]: 'drop' 0 or 1/(1-p) as the modules draw it, 'any' arbitrary values."""
    g = torch.Generator().manual_seed(seed)
    B, P = inp["h0"].shape
    u = torch.rand(B, P, generator=g, dtype=inp["x"].dtype)
    return (u > 0.3).to(u.dtype) / 0.7 if kind == "drop" else u * 2


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["drop", "any"])
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_matches_reference_fp64(cell, reverse, lengths, kind, size):
    T, B, I, H = size
    proj = max(1, H // 3) if cell == "lstm_proj" and H > 1 else 0
    if cell == "lstm_proj" and not proj:
        pytest.skip("proj_size needs hidden_size > 1")
    cell = cell.replace("_proj", "")
    inp = make_inputs(cell, T, B, I, H, proj=proj, seed=sum(size))
    check_parity(cell, inp, dict(atol=1e-10, rtol=0), lengths_for(lengths, T, B), reverse,
                 rec_mask=mask_for(inp, kind, seed=T))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_with_resets_and_zoneout(cell, reverse):
    proj = 4 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    T, B = 10, 5
    inp = make_inputs(cell, T, B, 6, 9, proj=proj, seed=2)
    zh, zc = zoneout_for(cell, inp, "mask", seed=3)
    resets = torch.rand(T, B, generator=torch.Generator().manual_seed(4)) < 0.3
    check_parity(cell, inp, dict(atol=1e-10, rtol=0), lengths_for("mixed", T, B), reverse,
                 rec_mask=mask_for(inp, "drop", seed=5), resets=resets, zoneout_h=zh,
                 zoneout_c=zc)


@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_fp32(cell):
    T, B, I, H = 20, 5, 16, 48
    inp = make_inputs(cell, T, B, I, H, dtype=torch.float32, seed=3)
    check_parity(cell, inp, dict(atol=2e-5, rtol=2e-5), lengths_for("mixed", T, B), True,
                 rec_mask=mask_for(inp, "drop", seed=5))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [5, 0, 2]], ids=["nolen", "len"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_gradcheck(cell, lengths, reverse):
    proj = 2 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    inp = make_inputs(cell, 5, 3, 3, 4, proj=proj)
    mask = mask_for(inp, "any", seed=6)
    names = list(leaves(inp))
    lens = torch.tensor(lengths) if lengths else None

    def fn(*args):
        return call(F, cell, dict(inp, **dict(zip(names, args))), lens, reverse, rec_mask=mask)

    assert torch.autograd.gradcheck(fn, [inp[k] for k in names])


def reference_with_masks(fast, x, lengths, masks):
    """reference_module with per-layer recurrent dropout masks (no zoneout)."""
    cell = KINDS[type(fast).__name__]
    D = 2 if fast.bidirectional else 1
    hx = fast._zero_state(x, x.shape[1])
    state = hx if cell == "lstm" else (hx,)
    finals = []
    for layer in range(fast.num_layers):
        ws = [tuple(getattr(fast, f"{n}_l{layer}{sfx}")
                    for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) + (None,)
              for sfx in ("", "_reverse")[:D]]
        s = [t[D * layer:D * (layer + 1)] for t in state]
        x, h, c = R.layer(cell, x, s[0], s[1] if cell == "lstm" else None, ws, lengths,
                          rec_mask=masks[layer])
        finals.append((h, c) if cell == "lstm" else (h,))
    return x, tuple(torch.cat(p) for p in zip(*finals))


@pytest.mark.parametrize("kind", list(KINDS))
def test_module_matches_reference(kind):
    """Two bidirectional layers with lengths: one mask [directions, B, H] per layer, drawn
    from the default generator, the same at every step."""
    T, B, I, H, L, p = 7, 4, 3, 5, 2, 0.3
    fast = module(kind, input_size=I, hidden_size=H, num_layers=L, bidirectional=True,
                  recurrent_dropout=p)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 2, 5, 0])
    torch.manual_seed(3)
    y, final = fast(x, lengths=lengths)
    torch.manual_seed(3)
    masks = [x.new_empty((2, B, H)).bernoulli_(1 - p).div_(1 - p) for _ in range(L)]
    assert set(masks[0].unique().tolist()) == {0.0, 1 / (1 - p)}
    y_ref, final_ref = reference_with_masks(fast, x, lengths, masks)
    outs = (y, *(final if kind == "LSTM" else (final,)))
    refs = (y_ref, *final_ref)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=0)
    inputs = [x, *fast.parameters()]
    cot = [torch.randn_like(o) for o in outs]
    for g, w in zip(torch.autograd.grad(outs, inputs, cot), torch.autograd.grad(refs, inputs, cot)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
    # Reproducible under the same seed, fresh otherwise; nothing at all in eval.
    torch.manual_seed(3)
    assert torch.equal(fast(x, lengths=lengths)[0], y)
    assert not torch.equal(fast(x, lengths=lengths)[0], y)
    plain = module(kind, input_size=I, hidden_size=H, num_layers=L, bidirectional=True).eval()
    assert torch.equal(fast.eval()(x, lengths=lengths)[0], plain(x, lengths=lengths)[0])


def test_double_backward():
    fast = module("GRU", input_size=3, hidden_size=4, num_layers=2, bidirectional=True,
                  recurrent_dropout=0.4, zoneout=0.2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in fast.named_parameters()]
    params = [t.detach().requires_grad_() for t in fast.parameters()]

    def fn(x, *ps):
        torch.manual_seed(2)  # the same masks at every call
        return torch.func.functional_call(fast, dict(zip(names, ps)), (x,),
                                          dict(lengths=torch.tensor([5, 3])))[0]

    assert torch.autograd.gradcheck(fn, [x, *params])
    assert torch.autograd.gradgradcheck(fn, [x, *params])


def rd_op_args(cell, D, reverse=False, proj=0):
    args = op_args(cell, D, torch.tensor([3, 1, 2]), reverse, proj=proj, T=3, B=3)
    P = args[2].shape[2]
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(D, 3, P, generator=g, dtype=torch.float64) < 0.5).double() * 2
    return args + (None, None, None, mask)


@pytest.mark.parametrize("D, reverse, proj", [(1, False, 0), (1, True, 0), (2, False, 0),
                                              (2, False, 2)])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck(cell, D, reverse, proj):
    if proj and cell != "lstm":
        pytest.skip("projection is LSTM only")
    args = rd_op_args(cell, D, reverse, proj)
    torch.library.opcheck(ops.forward, args)
    opcheck_backward_of(args)


@pytest.mark.parametrize("bad, match", [
    (1, r"recurrent_dropout probability has to be in \[0, 1\), but got 1"),
    (-0.01, r"recurrent_dropout probability has to be in \[0, 1\), but got -0.01"),
    ([0.1], "recurrent_dropout should be a number in range"),
])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_probability(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        module(kind, input_size=3, hidden_size=4, recurrent_dropout=bad)


@pytest.mark.parametrize("change, match", [
    (lambda m: m[:, :2], r"fastrnn: rec_mask must have shape \[1, 3, 4\]"),
    (lambda m: m.float(), "fastrnn: rec_mask has dtype Float"),
])
def test_op_bad_mask(change, match):
    args = rd_op_args("lstm", 1)
    with pytest.raises(RuntimeError, match=match):
        ops.forward(*args[:15], change(args[15]))


def test_repr():
    fast = fastrnn.LSTM(3, 4, recurrent_dropout=0.25, zoneout=0.1)
    assert "zoneout=0.1, recurrent_dropout=0.25" in repr(fast)
