"""State resets inside a sequence (``resets=``): kernels against the reference, the exact
rule against split episodes run by torch.nn, gradients, ops and argument errors."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import functional as F
from fastrnn import ops
from fastrnn import reference as R

from test_functional import (CELLS, EXTENSION_SIZES as SIZES, call, check_parity, leaves,
                             lengths_for, make_inputs, op_args, opcheck_backward_of)


def random_resets(T, B, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, B, generator=g) < p


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_matches_reference_fp64(cell, reverse, lengths, size):
    T, B, I, H = size
    proj = max(1, H // 3) if cell == "lstm_proj" and H > 1 else 0
    if cell == "lstm_proj" and not proj:
        pytest.skip("proj_size needs hidden_size > 1")
    cell = cell.replace("_proj", "")
    inp = make_inputs(cell, T, B, I, H, proj=proj, seed=sum(size))
    lens = lengths_for(lengths, T, B)
    check_parity(cell, inp, dict(atol=1e-10, rtol=0), lens, reverse,
                 resets=random_resets(T, B, seed=T * B))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_fp32(cell, reverse):
    T, B, I, H = 20, 5, 16, 48
    inp = make_inputs(cell, T, B, I, H, dtype=torch.float32, seed=3)
    lens = lengths_for("mixed", T, B)
    check_parity(cell, inp, dict(atol=2e-5, rtol=2e-5), lens, reverse,
                 resets=random_resets(T, B, seed=4))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [5, 0, 2]], ids=["nolen", "len"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_gradcheck(cell, lengths, reverse):
    proj = 2 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    inp = make_inputs(cell, 5, 3, 3, 4, proj=proj)
    names = list(leaves(inp))
    lens = torch.tensor(lengths) if lengths else None
    resets = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)

    def fn(*args):
        return call(F, cell, dict(inp, **dict(zip(names, args))), lens, reverse, resets=resets)

    assert torch.autograd.gradcheck(fn, [inp[k] for k in names])


@pytest.mark.parametrize("cell", CELLS)
def test_no_flags_equals_no_resets(cell):
    inp = make_inputs(cell, 9, 4, 5, 8)
    lens = torch.tensor([9, 3, 0, 6])
    for reverse in (False, True):
        got = call(F, cell, inp, lens, reverse, resets=torch.zeros(9, 4, dtype=torch.bool))
        want = call(F, cell, inp, lens, reverse)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    # A flag on the first step restarts from the state the step has anyway.
    first = torch.zeros(9, 4, dtype=torch.bool)
    first[0] = True
    for g, w in zip(call(F, cell, inp, resets=first), call(F, cell, inp)):
        assert torch.equal(g, w)


KINDS = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}


def pair(kind, **kw):
    torch.manual_seed(0)
    ref = KINDS[kind](**kw, dtype=torch.float64)
    fast = getattr(fastrnn, kind)(**kw, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def hx_for(kind, layers, dirs, B, H, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(layers * dirs, B, H, generator=g, dtype=torch.float64)
    if kind == "LSTM":
        return (h, torch.randn(layers * dirs, B, H, generator=g, dtype=torch.float64))
    return h


def take(hx, b):
    return tuple(t[:, b:b + 1] for t in hx) if isinstance(hx, tuple) else hx[:, b:b + 1]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_episodes_run_independently(kind, bidirectional):
    """The exact rule: a batch whose rows hold several episodes equals torch.nn run on each
    episode on its own from hx, in both directions, every layer; h_n is the last episode's."""
    T, B, I, H, L = 10, 3, 4, 6, 2
    fast, ref = pair(kind, input_size=I, hidden_size=H, num_layers=L,
                     bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = hx_for(kind, L, dirs, B, H, seed=1)
    starts = {0: [0, 4, 5], 1: [0], 2: [0, 9]}  # episode starts of each row
    lengths = torch.tensor([10, 8, 10])
    resets = torch.zeros(T, B, dtype=torch.bool)
    for b, s in starts.items():
        resets[s, b] = True
    resets[9, 1] = True  # at a padded step: ignored
    y, h_n = fast(x, hx, lengths=lengths, resets=resets)
    as_tuple = (lambda h: h) if kind == "LSTM" else (lambda h: (h,))
    for b, s in starts.items():
        bounds = s + [int(lengths[b])]
        finals = []
        for t0, t1 in zip(bounds, bounds[1:]):
            y_ref, h_ref = ref(x[t0:t1, b:b + 1], take(hx, b))
            torch.testing.assert_close(y[t0:t1, b:b + 1], y_ref, atol=1e-12, rtol=0)
            finals.append(as_tuple(h_ref))
        # h_n: forward directions end with the last episode, reverse ones with the first.
        for got, last, first in zip(as_tuple(take(h_n, b)), finals[-1], finals[0]):
            torch.testing.assert_close(got[0::dirs], last[0::dirs], atol=1e-12, rtol=0)
            if bidirectional:
                torch.testing.assert_close(got[1::2], first[1::2], atol=1e-12, rtol=0)
    assert torch.equal(y[8:, 1], torch.zeros_like(y[8:, 1]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_module_gradients_match_reference(kind):
    """Multi-layer bidirectional batch_first module, every gradient, against the reference
    layers stacked by hand."""
    T, B, I, H, L = 8, 4, 3, 5, 2
    fast, _ = pair(kind, input_size=I, hidden_size=H, num_layers=L, bidirectional=True,
                   batch_first=True)
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    hx = hx_for(kind, L, 2, B, H, seed=2)
    hx = tuple(h.requires_grad_() for h in hx) if kind == "LSTM" else hx.requires_grad_()
    lengths = torch.tensor([8, 3, 6, 1])
    resets = random_resets(B, T, seed=5, p=0.4)  # [B, T]: batch_first
    y, final = fast(x, hx, lengths=lengths, resets=resets)

    cell = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}[kind]
    state = hx if kind == "LSTM" else (hx,)
    xr, finals = x.transpose(0, 1), []
    for layer in range(L):
        weights = [tuple(getattr(fast, f"{n}_l{layer}{sfx}")
                         for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) + (None,)
                   for sfx in ("", "_reverse")]
        s = [t[2 * layer:2 * layer + 2] for t in state]
        xr, h, c = R.layer(cell, xr, s[0], s[1] if kind == "LSTM" else None, weights, lengths,
                           resets=resets.t())
        finals.append((h, c) if kind == "LSTM" else (h,))
    y_ref = xr.transpose(0, 1)
    final_ref = tuple(torch.cat(p) for p in zip(*finals))
    final_t = final if kind == "LSTM" else (final,)
    outs, refs = (y, *final_t), (y_ref, *final_ref)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=0)
    inputs = [x, *(hx if kind == "LSTM" else (hx,)), *fast.parameters()]
    cot = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, inputs, cot)
    want = torch.autograd.grad(refs, inputs, cot)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_unbatched_and_packed_inputs(kind):
    T, B, I, H = 7, 3, 4, 5
    fast, _ = pair(kind, input_size=I, hidden_size=H, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([4, 7, 2])
    resets = random_resets(T, B, seed=7, p=0.4)
    y, h_n = fast(x, lengths=lengths, resets=resets)
    # Unbatched: one sequence, resets [T].
    y1, _ = fast(x[:, 1], resets=resets[:, 1])
    torch.testing.assert_close(y1, y[:, 1], atol=1e-12, rtol=0)
    # PackedSequence: the flags packed like the input.
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    flags = pack_padded_sequence(resets, lengths, enforce_sorted=False)
    yp, hp = fast(packed, resets=flags)
    yp, _ = torch.nn.utils.rnn.pad_packed_sequence(yp)
    torch.testing.assert_close(yp, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(hp, h_n, atol=1e-12, rtol=0)


def test_double_backward():
    fast, _ = pair("LSTM", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    resets = torch.tensor([[0, 0], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    lengths = torch.tensor([5, 4])

    def fn(x, *params):
        out = torch.func.functional_call(fast, dict(zip(names, params)), (x,),
                                         dict(lengths=lengths, resets=resets))
        return out[0]

    names = [n for n, _ in fast.named_parameters()]
    params = [p.detach().requires_grad_() for p in fast.parameters()]
    assert torch.autograd.gradgradcheck(fn, [x, *params])


def resets_op_args(cell, D, reverse=False):
    args = op_args(cell, D, torch.tensor([3, 1, 2]), reverse, T=3, B=3)
    return args + (torch.tensor([[0, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool),)


@pytest.mark.parametrize("D, reverse", [(1, False), (1, True), (2, False)])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck(cell, D, reverse):
    args = resets_op_args(cell, D, reverse)
    torch.library.opcheck(ops.forward, args)
    opcheck_backward_of(args)


def test_compile_fullgraph():
    fast, _ = pair("GRU", input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    resets = random_resets(6, 2, seed=8, p=0.5)
    compiled = torch.compile(lambda x, r: fast(x, resets=r), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, resets), fast(x, resets=resets), atol=0, rtol=0)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(6, 2), TypeError, "resets must be a bool tensor, got dtype torch.float32"),
    ([[True, False]] * 6, TypeError, "resets must be a bool tensor, got list"),
    (torch.zeros(2, 6, dtype=torch.bool), ValueError,
     r"resets must have shape \[seq_len, batch\] = \[6, 2\].*got \[2, 6\]"),
    (torch.zeros(6, 2, 1, dtype=torch.bool), ValueError, "resets must have shape"),
    (torch.zeros(6, 2, dtype=torch.bool, device="meta"), RuntimeError,
     "resets is on meta but the input is on cpu"),
])
def test_bad_resets(bad, exc, match):
    fast, _ = pair("LSTM", input_size=3, hidden_size=4)
    with pytest.raises(exc, match=match):
        fast(torch.randn(6, 2, 3, dtype=torch.float64), resets=bad)


def test_bad_resets_batch_first_and_packed():
    fast, _ = pair("GRU", input_size=3, hidden_size=4, batch_first=True)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[batch, seq_len\] \(batch_first\) = \[2, 6\]"):
        fast(x, resets=torch.zeros(6, 2, dtype=torch.bool))
    packed = pack_padded_sequence(x, torch.tensor([6, 3]), batch_first=True)
    with pytest.raises(TypeError, match="resets must be a PackedSequence"):
        fast(packed, resets=torch.zeros(2, 6, dtype=torch.bool))
    other = pack_padded_sequence(torch.zeros(2, 6, dtype=torch.bool), torch.tensor([6, 2]),
                                 batch_first=True)
    with pytest.raises(ValueError, match="resets must be packed like the input"):
        fast(packed, resets=other)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 3), "fastrnn: resets must be a bool tensor, got Float"),
    (torch.zeros(3, 2, dtype=torch.bool), r"fastrnn: resets must have shape \[3, 3\]"),
])
def test_op_bad_resets(bad, match):
    args = resets_op_args("gru", 1)[:-1] + (bad,)
    with pytest.raises(RuntimeError, match=match):
        ops.forward(*args)
