"""fastrnn.LSTM/GRU/RNN and cells against torch.nn with copied weights.

Tolerances: float64 runs must agree to 1e-9 (far tighter than the 5e-5 that
PyTorch asks of cuDNN vs CPU); only the summation order differs, so a real
mismatch shows up as O(1e-2) or more. float32 uses torch's assert_close
defaults (rtol 1.3e-6, atol 1e-5): with T<=7 and I, H <= 5 each value comes
from fewer than ~100 accumulations of O(1) terms, i.e. a few 1e-6 at worst.
"""
import copy
import io
import itertools
import pickle
import re
import warnings
import zlib

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastrnn

# torch.nn.LSTM's float32 CPU path notes that oneDNN has no projections.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")

F64 = {"atol": 1e-9, "rtol": 1e-7}
F32 = {}  # torch.testing.assert_close defaults for float32

KINDS = {
    "rnn_tanh": (nn.RNN, fastrnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, fastrnn.RNN, {"nonlinearity": "relu"}),
    "gru": (nn.GRU, fastrnn.GRU, {}),
    "lstm": (nn.LSTM, fastrnn.LSTM, {}),
}
CELLS = {
    "rnn_tanh": (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "relu"}),
    "gru": (nn.GRUCell, fastrnn.GRUCell, {}),
    "lstm": (nn.LSTMCell, fastrnn.LSTMCell, {}),
}
T, B, I, H, P = 6, 3, 4, 5, 3  # steps, batch, input, hidden, projection

CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def make_pair(kind, dtype=torch.float64, device="cpu", **kwargs):
    """A torch.nn module (on the CPU) and a fastrnn module with the same weights."""
    ref_cls, fast_cls, extra = KINDS[kind]
    ref = ref_cls(I, H, **extra, **kwargs, dtype=dtype)
    fast = fast_cls(I, H, **extra, **kwargs, dtype=dtype, device=device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def leaf(t, device="cpu"):
    return t.detach().to(device).requires_grad_()


def flat_outputs(out):
    """(y, h) or (y, (h, c)), y possibly packed -> flat list of tensors."""
    y, state = out
    if isinstance(y, PackedSequence):
        y = y.data
    return [y] + (list(state) if isinstance(state, tuple) else [state])


def grads(outputs, weights, inputs):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_all_close(actual, expected, tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None or not a.any(), f"entry {i}"
            continue
        torch.testing.assert_close(a.cpu(), e.cpu(), **tol, msg=lambda m: f"entry {i}: {m}")


# --------------------------------------------------------------------------
# Parity grid
# --------------------------------------------------------------------------

INPUT_MODES = ["padded", "lengths", "packed_sorted", "packed_unsorted", "unbatched"]


def run_parity(kind, bias, bidirectional, batch_first, num_layers, proj, mode, hx_given,
               dtype=torch.float64, device="cpu", lengths_device=None, tol=F64):
    torch.manual_seed(zlib.crc32(repr((kind, bias, bidirectional, batch_first, num_layers,
                                       proj, mode, hx_given)).encode()))
    kwargs = dict(bias=bias, bidirectional=bidirectional, batch_first=batch_first,
                  num_layers=num_layers)
    if proj:
        kwargs["proj_size"] = P
    ref, fast = make_pair(kind, dtype, device, **kwargs)
    D = 2 if bidirectional else 1
    opts = {"dtype": dtype}

    if mode == "unbatched":
        x = torch.randn(T, I, **opts)
        state_batch = ()
    else:
        x = torch.randn(*((B, T) if batch_first else (T, B)), I, **opts)
        state_batch = (B,)
    hx = None
    if hx_given:
        h = torch.randn(num_layers * D, *state_batch, P if proj else H, **opts)
        hx = (h, torch.randn(num_layers * D, *state_batch, H, **opts)) if kind == "lstm" else h
    # Unsorted lengths; with lengths= the longest is shorter than T as well.
    lengths = torch.tensor([4, T - 1 if mode == "lengths" else T, 2])[torch.randperm(B)]
    if mode == "packed_sorted":
        lengths = lengths.sort(descending=True).values

    def call(module, device):
        xl = leaf(x, device)
        hl = None if hx is None else (
            tuple(leaf(t, device) for t in hx) if kind == "lstm" else leaf(hx, device))
        inputs = [xl] + ([] if hl is None else list(hl) if kind == "lstm" else [hl])
        if mode in ("padded", "unbatched"):
            out = module(xl, hl)
        elif mode == "lengths" and module is fast:
            out = module(xl, hl, lengths=lengths.to(lengths_device or device))
        else:
            packed = pack_padded_sequence(xl, lengths, batch_first=batch_first,
                                          enforce_sorted=mode == "packed_sorted")
            out = module(packed, hl)
            if mode == "lengths":  # torch's answer for lengths=: packed, then padded to T
                y, _ = pad_packed_sequence(out[0], batch_first=batch_first, total_length=T)
                out = (y, out[1])
        return out, inputs

    ref_out, ref_in = call(ref, "cpu")
    fast_out, fast_in = call(fast, device)
    assert type(fast_out[0]) is type(ref_out[0])
    assert type(fast_out[1]) is type(ref_out[1])
    if isinstance(ref_out[0], PackedSequence):
        for a, e in zip(fast_out[0][1:], ref_out[0][1:]):
            assert (a is None and e is None) or torch.equal(a.cpu(), e)
    ref_flat, fast_flat = flat_outputs(ref_out), flat_outputs(fast_out)
    assert [t.shape for t in fast_flat] == [t.shape for t in ref_flat]
    assert all(t.dtype == dtype for t in fast_flat)
    assert_all_close(fast_flat, ref_flat, tol)

    weights = [torch.randn_like(t) for t in ref_flat]
    names = [n for n, _ in ref.named_parameters()]
    assert names == [n for n, _ in fast.named_parameters()]
    ref_g = grads(ref_flat, weights, ref_in + list(ref.parameters()))
    fast_g = grads(fast_flat, [w.to(device) for w in weights], fast_in + list(fast.parameters()))
    assert_all_close(fast_g, ref_g, tol)


def grid():
    for kind in KINDS:
        for bias, bidir, bf, layers, proj, mode, hx_given in itertools.product(
                (True, False), (False, True), (False, True), (1, 2, 3), (False, True),
                INPUT_MODES, (False, True)):
            if proj and kind != "lstm":
                continue
            yield pytest.param(kind, bias, bidir, bf, layers, proj, mode, hx_given, id=(
                f"{kind}-{'bias' if bias else 'nobias'}-{'bi' if bidir else 'uni'}"
                f"-{'bf' if bf else 'tf'}-L{layers}{'-proj' if proj else ''}-{mode}"
                f"-{'hx' if hx_given else 'nohx'}"))


@pytest.mark.parametrize("kind,bias,bidir,bf,layers,proj,mode,hx_given", grid())
def test_parity_float64(kind, bias, bidir, bf, layers, proj, mode, hx_given):
    run_parity(kind, bias, bidir, bf, layers, proj, mode, hx_given)


def subset(kinds=KINDS):
    for kind, proj, mode, bf in itertools.product(kinds, (False, True), INPUT_MODES, (False, True)):
        if proj and kind != "lstm":
            continue
        yield pytest.param(kind, proj, mode, bf,
                           id=f"{kind}{'-proj' if proj else ''}-{mode}-{'bf' if bf else 'tf'}")


@pytest.mark.parametrize("kind,proj,mode,bf", subset())
def test_parity_float32(kind, proj, mode, bf):
    run_parity(kind, True, True, bf, 2, proj, mode, True, dtype=torch.float32, tol=F32)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("kind,proj,mode,bf", subset())
def test_parity_device(device, kind, proj, mode, bf):
    # Against torch.nn on the CPU in float64, so cuDNN's own choices play no part.
    run_parity(kind, True, True, bf, 2, proj, mode, True, device=device)
    if mode == "lengths":  # lengths may live on another device than the input
        run_parity(kind, True, True, bf, 2, proj, mode, True, device=device,
                   lengths_device="cpu")
    run_parity(kind, True, True, bf, 2, proj, mode, True, dtype=torch.float32, device=device,
               tol={"atol": 1e-4, "rtol": 1e-4})  # GPU GEMMs may reorder or use fewer bits


# --------------------------------------------------------------------------
# lengths= against torch.nn run on each sequence's unpadded prefix
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", (False, True))
def test_lengths_match_per_sequence(kind, bidirectional):
    torch.manual_seed(0)
    kwargs = {"bidirectional": bidirectional, "num_layers": 2}
    if kind == "lstm":
        kwargs["proj_size"] = P
    ref, fast = make_pair(kind, **kwargs)
    D = 2 if bidirectional else 1
    n = 5
    x = torch.randn(T, n, I, dtype=torch.float64)
    lengths = torch.tensor([3, T, 0, 1, 4])  # unsorted, with an empty sequence
    Hs = P if kind == "lstm" else H
    h0 = torch.randn(2 * D, n, Hs, dtype=torch.float64)
    c0 = torch.randn(2 * D, n, H, dtype=torch.float64)
    hx = (h0, c0) if kind == "lstm" else h0
    y, state = fast(x, hx, lengths=lengths)
    state = state if kind == "lstm" else (state,)
    for b in range(n):
        hb = tuple(s[:, b:b + 1] for s in (hx if kind == "lstm" else (hx,)))
        L = int(lengths[b])
        if L == 0:  # torch rejects empty sequences; the state passes through untouched
            assert not y[:, b].any()
            for s, s0 in zip(state, hb):
                torch.testing.assert_close(s[:, b], s0[:, 0], atol=0, rtol=0)
            continue
        yb, sb = ref(x[:L, b:b + 1], hb if kind == "lstm" else hb[0])
        sb = sb if kind == "lstm" else (sb,)
        torch.testing.assert_close(y[:L, b:b + 1], yb, **F64)
        assert not y[L:, b].any()
        for s, r in zip(state, sb):
            torch.testing.assert_close(s[:, b:b + 1], r, **F64)


def test_lengths_forms():
    torch.manual_seed(0)
    ref, fast = make_pair("gru", batch_first=True)
    x = torch.randn(B, T, I, dtype=torch.float64)
    lengths = [4, 2, 6]
    expected = fast(x, lengths=torch.tensor(lengths))
    for form in (lengths, torch.tensor(lengths, dtype=torch.int32)):
        out = fast(x, lengths=form)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # Unbatched input takes one length.
    y, h = fast(x[0], lengths=torch.tensor(4))
    torch.testing.assert_close(y, expected[0][0], **F64)  # batch 1 vs 3 may round differently
    torch.testing.assert_close(h, expected[1][:, 0], **F64)
    torch.testing.assert_close(fast(x[0], lengths=4), (y, h), atol=0, rtol=0)


# --------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("batched", (True, False))
@pytest.mark.parametrize("hx_given", (True, False))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_cell_parity(kind, bias, batched, hx_given, dtype):
    check_cell_parity(kind, bias, (B,) if batched else (), hx_given, dtype)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("rows", (8, 9, 32, 33))
def test_cell_parity_on_both_sides_of_the_in_place_bounds(kind, rows):
    """A one-step call reads the weights where they lie for up to 8 rows (forward products,
    gemm.h's kRowDotRows) and 32 rows (backward products, kInPlaceRows), and packs them for
    more: each side of each bound matches torch.nn. (H = 70: the products split over
    threads, with partial vectors at the edges.)"""
    check_cell_parity(kind, True, (rows,), True, torch.float64, sizes=(40, 70))


def check_cell_parity(kind, bias, shape, hx_given, dtype, sizes=(I, H)):
    torch.manual_seed(0)
    ref_cls, fast_cls, extra = CELLS[kind]
    n_in, hidden = sizes
    ref = ref_cls(n_in, hidden, bias=bias, **extra, dtype=dtype)
    fast = fast_cls(n_in, hidden, bias=bias, **extra, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, n_in, dtype=dtype)
    hx = None
    if hx_given:
        hx = torch.randn(*shape, hidden, dtype=dtype)
        if kind == "lstm":
            hx = (hx, torch.randn(*shape, hidden, dtype=dtype))

    def call(module):
        xl = leaf(x)
        hl = None if hx is None else tuple(map(leaf, hx)) if kind == "lstm" else leaf(hx)
        out = module(xl, hl)
        out = list(out) if kind == "lstm" else [out]
        inputs = [xl] + ([] if hl is None else list(hl) if kind == "lstm" else [hl])
        return out, inputs + list(module.parameters())

    ref_out, ref_in = call(ref)
    fast_out, fast_in = call(fast)
    tol = F64 if dtype == torch.float64 else F32
    assert_all_close(fast_out, ref_out, tol)
    w = [torch.randn_like(t) for t in ref_out]
    assert_all_close(grads(fast_out, w, fast_in), grads(ref_out, w, ref_in), tol)


@pytest.mark.parametrize("which", (0, 1))
def test_lstm_cell_backward_through_h_or_c_only(which):
    torch.manual_seed(0)
    ref = nn.LSTMCell(I, H, dtype=torch.float64)
    fast = fastrnn.LSTMCell(I, H, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    hx = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
    for module in (ref, fast):
        module(leaf(x), tuple(map(leaf, hx)))[which].sum().backward()
    for (name, a), (_, e) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, e.grad, **F64, msg=name)


# --------------------------------------------------------------------------
# Tests ported from PyTorch's own RNN tests
# --------------------------------------------------------------------------

@pytest.mark.parametrize("p", (0, 0.276, 0.731, 1))
@pytest.mark.parametrize("train", (True, False))
def test_dropout_all_ones(p, train):
    # As test_nn's test_RNN_dropout: with all-ones weights every layer-1 unit
    # sums the same (dropped) layer-0 outputs, so the effect of dropout is exact.
    hidden = 100
    rnn = fastrnn.RNN(10, hidden, 2, bias=False, dropout=p, nonlinearity="relu")
    rnn.train(train)
    with torch.no_grad():
        for w in rnn.parameters():
            w.fill_(1)
    out, hy = rnn(torch.ones(1, 1, 10), torch.zeros(2, 1, hidden))
    assert torch.equal(hy[0], torch.full((1, hidden), 10.0))
    torch.testing.assert_close(hy[1], out[0])
    if p == 0 or not train:
        assert torch.equal(out, torch.full((1, 1, hidden), 10.0 * hidden))
    elif p == 1:
        assert torch.equal(out, torch.zeros(1, 1, hidden))
    else:
        # Every output unit sees the same k kept inputs, each scaled by 1/(1-p).
        assert torch.all(out == out[0, 0, 0])
        kept = out[0, 0, 0].item() * (1 - p) / 10
        assert abs(kept - round(kept)) < 1e-3 and 0 < round(kept) < hidden


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_seeded_and_train_only(kind):
    torch.manual_seed(0)
    _, fast = make_pair(kind, num_layers=3, dropout=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    fast.train()
    torch.manual_seed(7)
    a = flat_outputs(fast(x))
    torch.manual_seed(7)
    b = flat_outputs(fast(x))
    torch.manual_seed(8)
    c = flat_outputs(fast(x))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[0], c[0])
    fast.eval()
    torch.manual_seed(9)
    e1 = flat_outputs(fast(x))
    e2 = flat_outputs(fast(x))
    assert all(torch.equal(s, t) for s, t in zip(e1, e2))
    # dropout only sits between layers: the first layer's state is never dropped
    assert torch.equal(a[1][:1], e1[1][:1])
    assert not torch.equal(a[0], e1[0])


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_warning_single_layer(kind):
    ref_cls, fast_cls, extra = KINDS[kind]
    with warnings.catch_warnings(record=True) as expected:
        warnings.simplefilter("always")
        ref_cls(I, H, dropout=0.3, **extra)
    with pytest.warns(UserWarning, match=re.escape(str(expected[0].message))):
        fast = fast_cls(I, H, dropout=0.3, **extra)
    # With one layer there is nothing to drop: training output equals eval output.
    x = torch.randn(T, B, I)
    torch.testing.assert_close(fast.train()(x), fast.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", (False, True))
def test_batch_zero(kind, batch_first):
    ref, fast = make_pair(kind, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(*((0, T) if batch_first else (T, 0)), I, dtype=torch.float64,
                    requires_grad=True)
    ref_out, fast_out = flat_outputs(ref(x)), flat_outputs(fast(x))
    assert [t.shape for t in fast_out] == [t.shape for t in ref_out]
    sum(t.sum() for t in fast_out).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("kind", CELLS)
def test_cell_batch_zero(kind):
    ref_cls, fast_cls, extra = CELLS[kind]
    out = fast_cls(I, H, **extra)(torch.randn(0, I))
    ref = ref_cls(I, H, **extra)(torch.randn(0, I))
    assert [t.shape for t in out] == [t.shape for t in ref]


@pytest.mark.parametrize("kind", KINDS)
def test_hx_none_equals_zeros(kind):
    torch.manual_seed(0)
    kwargs = {"num_layers": 2, "bidirectional": True}
    if kind == "lstm":
        kwargs["proj_size"] = P
    _, fast = make_pair(kind, **kwargs)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h = torch.zeros(4, B, P if kind == "lstm" else H, dtype=torch.float64)
    hx = (h, torch.zeros(4, B, H, dtype=torch.float64)) if kind == "lstm" else h
    a, b = flat_outputs(fast(x)), flat_outputs(fast(x, hx))
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_backward_retain_graph(kind):
    torch.manual_seed(0)
    _, fast = make_pair(kind, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    out = flat_outputs(fast(x))
    loss = sum(t.sum() for t in out)
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in fast.parameters()]
    for _ in range(2):
        x.grad = None
        fast.zero_grad()
        loss.backward(retain_graph=True)
        again = [x.grad] + [p.grad for p in fast.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("kind", KINDS)
def test_weight_tying_and_optimizer_step(kind):
    torch.manual_seed(0)
    ref, fast = make_pair(kind, bidirectional=True)
    for m in (ref, fast):
        m.weight_hh_l0_reverse = m.weight_hh_l0  # one Parameter under two names
    assert fast.weight_hh_l0_reverse is fast.weight_hh_l0
    x = torch.randn(T, B, I, dtype=torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, fast)]
    for _ in range(3):
        for m, opt in zip((ref, fast), opts):
            opt.zero_grad()
            sum((t ** 2).sum() for t in flat_outputs(m(x))).backward()
            opt.step()
        for (name, a), (_, e) in zip(fast.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(a, e, **F64, msg=name)
    assert fast.weight_hh_l0_reverse is fast.weight_hh_l0
    assert_all_close(flat_outputs(fast(x)), flat_outputs(ref(x)), F64)


# --------------------------------------------------------------------------
# Parameters, state_dict and module behaviour
# --------------------------------------------------------------------------

ARGS = [
    {}, {"num_layers": 3, "bidirectional": True}, {"bias": False, "batch_first": True},
    {"num_layers": 2, "dropout": 0.25},
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kwargs", ARGS + [{"proj_size": P, "num_layers": 2}])
def test_same_parameters_init_and_repr(kind, kwargs):
    if "proj_size" in kwargs and kind != "lstm":
        pytest.skip("proj_size is LSTM only")
    ref_cls, fast_cls, extra = KINDS[kind]
    torch.manual_seed(3)
    ref = ref_cls(I, H, **extra, **kwargs)
    torch.manual_seed(3)
    fast = fast_cls(I, H, **extra, **kwargs)
    # Same names, shapes, order and the very same initial values for the same seed.
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], fast_sd[k]), k
    assert repr(fast) == repr(ref)
    assert not isinstance(fast, ref_cls)
    assert isinstance(fast, nn.RNNBase)
    assert [[w.shape for w in ws] for ws in fast.all_weights] == \
        [[w.shape for w in ws] for ws in ref.all_weights]


@pytest.mark.parametrize("kind", CELLS)
def test_cell_same_parameters_init_and_repr(kind):
    ref_cls, fast_cls, extra = CELLS[kind]
    torch.manual_seed(3)
    ref = ref_cls(I, H, bias=False, **extra)
    torch.manual_seed(3)
    fast = fast_cls(I, H, bias=False, **extra)
    assert list(ref.state_dict()) == list(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), fast.parameters()))
    assert fast.bias_ih is None and fast.bias_hh is None
    assert repr(fast) == repr(ref)
    assert not isinstance(fast, ref_cls)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips(kind):
    torch.manual_seed(0)
    ref_cls, fast_cls, extra = KINDS[kind]
    kwargs = {"num_layers": 2, "bidirectional": True, **extra}
    ref = ref_cls(I, H, **kwargs, dtype=torch.float64)
    fast = fast_cls(I, H, **kwargs, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())  # torch -> fastrnn
    assert_all_close(flat_outputs(fast(x)), flat_outputs(ref(x)), F64)
    back = ref_cls(I, H, **kwargs, dtype=torch.float64)
    back.load_state_dict(fast.state_dict())  # fastrnn -> torch
    assert_all_close(flat_outputs(back(x)), flat_outputs(fast(x)), F64)


@pytest.mark.parametrize("kind", CELLS)
def test_cell_state_dict_round_trips(kind):
    ref_cls, fast_cls, extra = CELLS[kind]
    ref = ref_cls(I, H, **extra, dtype=torch.float64)
    fast = fast_cls(I, H, **extra, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    back = ref_cls(I, H, **extra, dtype=torch.float64)
    back.load_state_dict(fast.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    for a, b in ((fast, ref), (back, fast)):
        out_a, out_b = a(x), b(x)
        torch.testing.assert_close(out_a, out_b, **F64)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_copy_pickle_and_save(kind):
    torch.manual_seed(0)
    _, fast = make_pair(kind, num_layers=2, bidirectional=True, dtype=torch.float32)
    x = torch.randn(T, B, I)
    expected = flat_outputs(fast.double()(x.double()))
    assert all(p.dtype == torch.float64 for p in fast.parameters())
    fast.to(torch.float32)
    assert flat_outputs(fast(x))[0].dtype == torch.float32
    fast.double()
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    copies = [copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)),
              torch.load(buf, weights_only=False)]
    for other in copies:
        assert type(other) is type(fast)
        assert_all_close(flat_outputs(other(x.double())), expected, F64)
        assert other.weight_ih_l0 is not fast.weight_ih_l0


@pytest.mark.parametrize("kind", CELLS)
def test_cell_dtype_copy_and_pickle(kind):
    _, fast_cls, extra = CELLS[kind]
    fast = fast_cls(I, H, **extra).double()
    x = torch.randn(B, I, dtype=torch.float64)
    expected = fast(x)
    for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        torch.testing.assert_close(other(x), expected, atol=0, rtol=0)


def test_flatten_parameters_is_a_no_op():
    fast = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True)
    ptrs = [p.data_ptr() for p in fast.parameters()]
    params = list(fast.parameters())
    assert fast.flatten_parameters() is None
    assert [p.data_ptr() for p in fast.parameters()] == ptrs
    assert all(a is b for a, b in zip(params, fast.parameters()))
    fast(torch.randn(T, B, I))


def test_train_eval_and_functional_call():
    torch.manual_seed(0)
    ref, fast = make_pair("lstm", num_layers=2, dropout=0.5)
    assert fast.training and not fast.eval().training
    x = torch.randn(T, B, I, dtype=torch.float64)
    params = {k: torch.randn_like(v) for k, v in fast.named_parameters()}
    out = torch.func.functional_call(fast, params, (x,))
    ref.eval()
    ref.load_state_dict(params)
    assert_all_close(flat_outputs(out), flat_outputs(ref(x)), F64)


# --------------------------------------------------------------------------
# Errors: the same type and message as torch.nn
# --------------------------------------------------------------------------

def assert_same_error(ref_fn, fast_fn):
    with pytest.raises(Exception) as expected:
        ref_fn()
    with pytest.raises(expected.type, match="^" + re.escape(str(expected.value)) + "$"):
        fast_fn()


CTOR_ERRORS = [
    ("rnn_tanh", {"hidden_size": 0}), ("lstm", {"hidden_size": -1}),
    ("gru", {"num_layers": 0}), ("lstm", {"input_size": 0}),
    ("lstm", {"proj_size": H}), ("lstm", {"proj_size": -1}),
    ("gru", {"proj_size": 2}), ("rnn_tanh", {"proj_size": 2}),
    ("lstm", {"dropout": -0.1}), ("gru", {"dropout": 1.5}), ("rnn_relu", {"dropout": True}),
    ("lstm", {"dropout": "0.1"}), ("gru", {"bias": 1}), ("lstm", {"batch_first": None}),
    ("lstm", {"hidden_size": 2.0}), ("rnn_tanh", {"nonlinearity": "sigmoid"}),
]


@pytest.mark.parametrize("kind,kwargs", CTOR_ERRORS)
def test_constructor_errors(kind, kwargs):
    ref_cls, fast_cls, extra = KINDS[kind]
    kwargs = {"input_size": I, "hidden_size": H, **extra, **kwargs}
    assert_same_error(lambda: ref_cls(**kwargs), lambda: fast_cls(**kwargs))


def test_rnn_positional_nonlinearity():
    torch.manual_seed(0)
    ref = nn.RNN(I, H, 2, "relu", False)
    torch.manual_seed(0)
    fast = fastrnn.RNN(I, H, 2, "relu", False)
    assert fast.nonlinearity == "relu" and fast.mode == "RNN_RELU" and not fast.bias
    assert repr(fast) == repr(ref)
    assert_same_error(lambda: nn.RNN(I, H, 1, "gelu"), lambda: fastrnn.RNN(I, H, 1, "gelu"))


def _hx(kind, *shape_h, shape_c=None, **opts):
    h = torch.randn(*shape_h, **opts)
    if kind != "lstm":
        return h
    return (h, torch.randn(*(shape_c or shape_h), **opts))


def forward_error_cases():
    f64 = {"dtype": torch.float64}
    for kind in KINDS:
        yield kind, "input rank 1", {}, lambda k: (torch.randn(I, **f64), None)
        yield kind, "input rank 4", {}, lambda k: (torch.randn(T, B, I, 1, **f64), None)
        yield kind, "feature size", {}, lambda k: (torch.randn(T, B, I + 1, **f64), None)
        yield kind, "unbatched feature size", {}, lambda k: (torch.randn(T, I + 1, **f64), None)
        yield kind, "input dtype", {}, lambda k: (torch.randn(T, B, I), None)
        yield kind, "hx batch", {}, lambda k: (torch.randn(T, B, I, **f64),
                                              _hx(k, 1, B + 1, H, **f64))
        yield kind, "hx layers", {"num_layers": 2}, lambda k: (
            torch.randn(T, B, I, **f64), _hx(k, 1, B, H, **f64))
        yield kind, "hx size", {}, lambda k: (torch.randn(T, B, I, **f64),
                                             _hx(k, 1, B, H + 1, **f64))
        yield kind, "hx rank batched", {}, lambda k: (torch.randn(T, B, I, **f64),
                                                     _hx(k, 1, H, **f64))
        yield kind, "hx rank unbatched", {}, lambda k: (torch.randn(T, I, **f64),
                                                       _hx(k, 1, 1, H, **f64))
        yield kind, "hx batch_first", {"batch_first": True}, lambda k: (
            torch.randn(B, T, I, **f64), _hx(k, B, 1, H, **f64))
        yield kind, "hx dtype", {}, lambda k: (torch.randn(T, B, I, **f64), _hx(k, 1, B, H))
        yield kind, "hx device", {}, lambda k: (torch.randn(T, B, I, **f64),
                                               _hx(k, 1, B, H, device="meta", **f64))
        yield kind, "input device", {}, lambda k: (
            torch.randn(T, B, I, device="meta", **f64), None)
        yield kind, "zero steps", {}, lambda k: (torch.randn(0, B, I, **f64), None)
        yield kind, "packed feature size", {}, lambda k: (
            pack_padded_sequence(torch.randn(T, B, I + 1, **f64), [T, 2, 1]), None)
        yield kind, "packed hx batch", {}, lambda k: (
            pack_padded_sequence(torch.randn(T, B, I, **f64), [T, 2, 1]),
            _hx(k, 1, B + 1, H, **f64))
    yield "lstm", "cx size", {}, lambda k: (torch.randn(T, B, I, **f64),
                                           _hx(k, 1, B, H, shape_c=(1, B, H + 1), **f64))
    yield "lstm", "hx proj size", {"proj_size": P}, lambda k: (
        torch.randn(T, B, I, **f64), _hx(k, 1, B, H, **f64))
    yield "lstm", "cx rank", {}, lambda k: (torch.randn(T, B, I, **f64),
                                           _hx(k, 1, B, H, shape_c=(B, H), **f64))


# torch.nn.LSTM checks nothing for packed input (wrong sizes can crash the
# process), so for those cases fastrnn's message is compared with GRU's.
PACKED_LSTM_UNCHECKED = {"packed feature size", "packed hx batch"}


@pytest.mark.parametrize("kind,what,kwargs,make", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}") for case in forward_error_cases()])
def test_forward_errors(kind, what, kwargs, make):
    torch.manual_seed(0)
    ref, fast = make_pair(kind, **kwargs)
    x, hx = make(kind)
    if kind == "lstm" and what in PACKED_LSTM_UNCHECKED:
        ref, _ = make_pair("gru", **kwargs)
        with pytest.raises(RuntimeError) as expected:
            ref(x, hx if hx is None else hx[0])
        with pytest.raises(RuntimeError, match=re.escape(str(expected.value))
                           .replace("hidden", r"hidden\[0\]")):
            fast(x, hx)
        return
    assert_same_error(lambda: ref(x, hx), lambda: fast(x, hx))


def test_hidden_dtype_mismatch_message():
    # torch.nn.LSTM's float32 path reports this from oneDNN; fastrnn gives the
    # message torch uses everywhere else.
    fast = fastrnn.LSTM(I, H)
    hx = (torch.randn(1, B, H, dtype=torch.float64), torch.randn(1, B, H))
    with pytest.raises(RuntimeError, match="must have the same dtype, but got Double and Float"):
        fast(torch.randn(T, B, I), hx)


LENGTHS_ERRORS = [
    (torch.tensor([T + 1, 1, 1]), ValueError, "must not exceed the sequence length 6"),
    (torch.tensor([2, 1]), ValueError, r"one entry per sequence: expected shape \[3\]"),
    (torch.tensor([[2, 1, 1]]), ValueError, "1-D tensor"),
    (torch.tensor([2, -1, 1]), ValueError, "must be non-negative, got -1"),
    (torch.tensor([2.0, 1.0, 1.0]), TypeError, "integer tensor"),
]


@pytest.mark.parametrize("lengths,exc,msg", LENGTHS_ERRORS)
@pytest.mark.parametrize("batch_first", (False, True))
def test_lengths_errors(lengths, exc, msg, batch_first):
    fast = fastrnn.GRU(I, H, batch_first=batch_first)
    x = torch.randn(*((B, T) if batch_first else (T, B)), I)
    with pytest.raises(exc, match=msg):
        fast(x, lengths=lengths)


def test_lengths_with_packed_input_is_an_error():
    packed = pack_padded_sequence(torch.randn(T, B, I), [T, 2, 1])
    with pytest.raises(ValueError, match="PackedSequence"):
        fastrnn.LSTM(I, H)(packed, lengths=torch.tensor([T, 2, 1]))


def cell_error_cases():
    for kind in CELLS:
        st = (lambda *s, **o: (torch.randn(*s, **o), torch.randn(*s, **o))) if kind == "lstm" \
            else torch.randn
        yield kind, "input rank", lambda st=st: (torch.randn(B, 1, I), None)
        yield kind, "input size", lambda st=st: (torch.randn(B, I + 1), None)
        yield kind, "hidden size", lambda st=st: (torch.randn(B, I), st(B, H + 1))
        yield kind, "batch", lambda st=st: (torch.randn(B, I), st(B + 1, H))
        yield kind, "hidden rank", lambda st=st: (torch.randn(B, I), st(1, B, H))
        yield kind, "unbatched hidden", lambda st=st: (torch.randn(I), st(B, H))
        yield kind, "batched 1-D hidden", lambda st=st: (torch.randn(B, I), st(H))
        yield kind, "input dtype", lambda st=st: (torch.randn(B, I, dtype=torch.float64), None)
        yield kind, "hidden dtype", lambda st=st: (torch.randn(B, I),
                                                   st(B, H, dtype=torch.float64))
    yield "lstm", "cx size", lambda: (torch.randn(B, I), (torch.randn(B, H),
                                                         torch.randn(B, H + 1)))
    yield "lstm", "cx batch", lambda: (torch.randn(B, I), (torch.randn(B, H),
                                                          torch.randn(B + 1, H)))
    yield "lstm", "one state", lambda: (torch.randn(B, I), (torch.randn(B, H),))


@pytest.mark.parametrize("kind,what,make", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}") for case in cell_error_cases()])
def test_cell_errors(kind, what, make):
    ref_cls, fast_cls, extra = CELLS[kind]
    ref, fast = ref_cls(I, H, **extra), fast_cls(I, H, **extra)
    x, hx = make()
    assert_same_error(lambda: ref(x, hx), lambda: fast(x, hx))


def test_rnn_cell_unknown_nonlinearity():
    ref, fast = nn.RNNCell(I, H, nonlinearity="gelu"), fastrnn.RNNCell(I, H, nonlinearity="gelu")
    assert_same_error(lambda: ref(torch.randn(B, I)), lambda: fast(torch.randn(B, I)))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell",
                                  "LayerNormLSTM", "LayerNormGRU"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_forward_mode_ad_is_an_error(kind, frozen):
    """fastrnn has no forward-mode formula: a dual input is a NotImplementedError, whether or
    not the parameters need gradients (frozen ones once let the call through with its
    tangent dropped). The LayerNorm layers' Python autograd.Function says it in torch's
    words when it records."""
    import torch.autograd.forward_ad as fwAD

    m = getattr(fastrnn, kind)(3, 4).requires_grad_(not frozen)
    x = torch.randn(2, 3) if kind.endswith("Cell") else torch.randn(5, 2, 3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD|with forward mode AD"):
            m(dual)
