"""Zoneout (``zoneout=p``): the fused kernels against the reference for any weights of the
previous state, the modules' masks (training) and expected value (eval), gradients, ops and
argument errors."""
import pytest
import torch

import fastrnn
from fastrnn import functional as F
from fastrnn import ops
from fastrnn import reference as R

from test_functional import (CELLS, EXTENSION_SIZES as SIZES, call, check_parity, leaves,
                             lengths_for, make_inputs, op_args, opcheck_backward_of)


def weights(T, B, n, kind, seed, dtype=torch.float64):
    """Zoneout weights [T, B, n]: 'mask' 0/1 as in training, 'mix' any value in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(T, B, n, generator=g, dtype=dtype)
    return (u < 0.4).to(dtype) if kind == "mask" else u


def zoneout_for(cell, inp, kind, seed):
    T, B, _ = inp["x"].shape
    P, H = inp["h0"].shape[1], inp["w_hh"].shape[0] // {"lstm": 4, "gru": 3}.get(cell, 1)
    dtype = inp["x"].dtype
    zh = weights(T, B, P, kind, seed, dtype)
    zc = weights(T, B, H, kind, seed + 1, dtype) if cell == "lstm" else None
    return zh, zc


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["mask", "mix"])
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
    zh, zc = zoneout_for(cell, inp, kind, seed=T + B)
    check_parity(cell, inp, dict(atol=1e-10, rtol=0), lengths_for(lengths, T, B), reverse,
                 zoneout_h=zh, zoneout_c=zc)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_with_resets(cell, reverse):
    proj = 4 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    T, B = 10, 5
    inp = make_inputs(cell, T, B, 6, 9, proj=proj, seed=2)
    zh, zc = zoneout_for(cell, inp, "mask", seed=3)
    resets = torch.rand(T, B, generator=torch.Generator().manual_seed(4)) < 0.3
    check_parity(cell, inp, dict(atol=1e-10, rtol=0), lengths_for("mixed", T, B), reverse,
                 resets=resets, zoneout_h=zh, zoneout_c=zc)


@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_fp32(cell):
    T, B, I, H = 20, 5, 16, 48
    inp = make_inputs(cell, T, B, I, H, dtype=torch.float32, seed=3)
    zh, zc = zoneout_for(cell, inp, "mix", seed=5)
    check_parity(cell, inp, dict(atol=2e-5, rtol=2e-5), lengths_for("mixed", T, B), True,
                 zoneout_h=zh, zoneout_c=zc)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [5, 0, 2]], ids=["nolen", "len"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_gradcheck(cell, lengths, reverse):
    proj = 2 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    inp = make_inputs(cell, 5, 3, 3, 4, proj=proj)
    zh, zc = zoneout_for(cell, inp, "mix", seed=6)
    names = list(leaves(inp))
    lens = torch.tensor(lengths) if lengths else None

    def fn(*args):
        return call(F, cell, dict(inp, **dict(zip(names, args))), lens, reverse,
                    zoneout_h=zh, zoneout_c=zc)

    assert torch.autograd.gradcheck(fn, [inp[k] for k in names])


KINDS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}


def module(kind, **kw):
    torch.manual_seed(0)
    return getattr(fastrnn, kind)(dtype=torch.float64, **kw)


def reference_module(fast, x, hx, lengths, masks):
    """The module's layers by hand with fastrnn.reference; masks: per layer (z_h, z_c)."""
    cell = KINDS[type(fast).__name__]
    D = 2 if fast.bidirectional else 1
    state = hx if cell == "lstm" else (hx,)
    finals = []
    for layer in range(fast.num_layers):
        ws = [tuple(getattr(fast, f"{n}_l{layer}{sfx}")
                    for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) + (None,)
              for sfx in ("", "_reverse")[:D]]
        s = [t[D * layer:D * (layer + 1)] for t in state]
        x, h, c = R.layer(cell, x, s[0], s[1] if cell == "lstm" else None, ws, lengths,
                          zoneout_h=masks[layer][0], zoneout_c=masks[layer][1])
        finals.append((h, c) if cell == "lstm" else (h,))
    return x, tuple(torch.cat(p) for p in zip(*finals))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_module_matches_reference(kind, training):
    """Two bidirectional layers with lengths; training masks are drawn per layer (z_h, then
    z_c), [directions, T, B, size], from the default generator."""
    T, B, I, H, L, p = 7, 4, 3, 5, 2, 0.3
    fast = module(kind, input_size=I, hidden_size=H, num_layers=L, bidirectional=True,
                  zoneout=p).train(training)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 2, 5, 0])
    torch.manual_seed(3)
    y, final = fast(x, lengths=lengths)
    torch.manual_seed(3)
    sizes = (H, H) if kind == "LSTM" else (H,)
    if training:
        masks = [tuple(x.new_empty((2, T, B, n)).bernoulli_(p) for n in sizes) for _ in range(L)]
    else:
        masks = [tuple(x.new_full((2, T, B, n), p) for n in sizes) for _ in range(L)]
    masks = [m + (None,) * (2 - len(m)) for m in masks]
    hx = fast._zero_state(x, B)
    y_ref, final_ref = reference_module(fast, x, hx, lengths, masks)
    outs = (y, *(final if kind == "LSTM" else (final,)))
    refs = (y_ref, *final_ref)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=0)
    inputs = [x, *fast.parameters()]
    cot = [torch.randn_like(o) for o in outs]
    for g, w in zip(torch.autograd.grad(outs, inputs, cot), torch.autograd.grad(refs, inputs, cot)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_training_masks_are_reproducible_and_fresh():
    fast = module("LSTM", input_size=3, hidden_size=64, zoneout=0.5)
    x = torch.randn(50, 8, 3, dtype=torch.float64)
    torch.manual_seed(1)
    y1, _ = fast(x)
    torch.manual_seed(1)
    y2, _ = fast(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(fast(x)[0], y1)
    # About half the units keep their previous value at each step.
    kept = (y1[1:] == y1[:-1]).double().mean().item()
    assert 0.45 < kept < 0.55, kept
    # eval: deterministic and no unit is exactly kept.
    fast.eval()
    y3, _ = fast(x)
    assert torch.equal(y3, fast(x)[0])
    assert (y3[1:] == y3[:-1]).double().mean().item() < 0.01


def test_zero_zoneout_draws_nothing():
    fast = module("GRU", input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.manual_seed(9)
    fast(x)
    after = torch.rand(1)
    torch.manual_seed(9)
    assert torch.equal(torch.rand(1), after)


def test_double_backward():
    fast = module("LSTM", input_size=3, hidden_size=4, num_layers=2, bidirectional=True,
                  zoneout=0.4)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 3])
    names = [n for n, _ in fast.named_parameters()]
    params = [t.detach().requires_grad_() for t in fast.parameters()]

    def fn(x, *ps):
        torch.manual_seed(2)  # the same masks at every call
        return torch.func.functional_call(fast, dict(zip(names, ps)), (x,),
                                          dict(lengths=lengths))[0]

    assert torch.autograd.gradcheck(fn, [x, *params])
    assert torch.autograd.gradgradcheck(fn, [x, *params])


def zoneout_op_args(cell, D, reverse=False, proj=0):
    args = op_args(cell, D, torch.tensor([3, 1, 2]), reverse, proj=proj, T=3, B=3)
    g = torch.Generator().manual_seed(1)
    P, H = args[2].shape[2], args[5].shape[1] // {"lstm": 4, "gru": 3}.get(cell, 1)
    zh = (torch.rand(D, 3, 3, P, generator=g, dtype=torch.float64) < 0.5).double()
    zc = torch.rand(D, 3, 3, H, generator=g, dtype=torch.float64) if cell == "lstm" else None
    return args + (None, zh, zc)


@pytest.mark.parametrize("D, reverse, proj", [(1, False, 0), (1, True, 0), (2, False, 0),
                                              (2, False, 2)])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck(cell, D, reverse, proj):
    if proj and cell != "lstm":
        pytest.skip("projection is LSTM only")
    args = zoneout_op_args(cell, D, reverse, proj)
    torch.library.opcheck(ops.forward, args)
    opcheck_backward_of(args)


def test_compile_fullgraph():
    fast = module("LSTM", input_size=3, hidden_size=4, zoneout=0.2).eval()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x)[0], fast(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (1.0, r"zoneout probability has to be in \[0, 1\), but got 1.0"),
    (-0.5, r"zoneout probability has to be in \[0, 1\), but got -0.5"),
    (None, "zoneout should be a number in range"),
])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_probability(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        module(kind, input_size=3, hidden_size=4, zoneout=bad)


@pytest.mark.parametrize("cell, change, match", [
    ("gru", lambda a: a[:13] + (a[13][:, :2],), r"fastrnn: zoneout_h must have shape \[1, 3, 3, 4\]"),
    ("gru", lambda a: a[:13] + (a[13].float(),), "fastrnn: zoneout_h has dtype Float"),
    ("gru", lambda a: a[:14] + (a[13],), "fastrnn: zoneout_c is only used by cell 'lstm'"),
    ("lstm", lambda a: a[:14], "fastrnn: cell 'lstm' takes zoneout_h and zoneout_c together"),
    ("lstm", lambda a: a[:14] + (a[14][..., :3],), r"fastrnn: zoneout_c must have shape"),
])
def test_op_bad_zoneout(cell, change, match):
    args = change(zoneout_op_args(cell, 1))
    with pytest.raises(RuntimeError, match=match):
        ops.forward(*args)
