"""Second-order gradients: gradgradcheck, and gradient-penalty losses against torch.nn.

fastrnn::backward has no derivative of its own; with create_graph=True the first-order
gradients are rebuilt as a differentiable graph (ops.py). These tests check that graph
against finite differences (gradgradcheck) and against torch.nn's own double backward,
parameter by parameter, and that the first-order path never takes it.
"""
import zlib

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import functional as F
from fastrnn import ops

from test_functional import CELLS, call, leaves, make_inputs, op_args
from test_modules import CELLS as CELL_KINDS
from test_modules import KINDS, F64, I, H, P, T, B, leaf

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")


# ---- gradgradcheck ----------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [3, 0, 2]], ids=["nolen", "len"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_gradgradcheck(cell, lengths, reverse):
    proj = 2 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    inp = make_inputs(cell, 3, 3, 2, 3, proj=proj, seed=7)
    names = list(leaves(inp))
    lens = torch.tensor(lengths) if lengths else None

    def fn(*args):
        return call(F, cell, dict(inp, **dict(zip(names, args))), lens, reverse)

    assert torch.autograd.gradgradcheck(fn, [inp[k] for k in names])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradgradcheck_bidirectional_layer(cell):
    """Both directions of one fused call (F.layer), with lengths."""
    fwd, bwd = (make_inputs(cell, 3, 3, 2, 3, seed=s) for s in (1, 2))
    keys = ("w_ih", "w_hh", "b_ih", "b_hh")
    lens = torch.tensor([2, 3, 1])

    def fn(x, h0, c0, *w):
        weights = [tuple(w[:4]) + (None,), tuple(w[4:]) + (None,)]
        return F.layer(cell, x, h0, c0, weights, lens)[:2 if c0 is None else 3]

    h0 = torch.stack([fwd["h0"], bwd["h0"]]).detach().requires_grad_()
    c0 = (torch.stack([fwd["c0"], bwd["c0"]]).detach().requires_grad_()
          if cell == "lstm" else None)
    args = [fwd["x"], h0, c0] + [fwd[k] for k in keys] + [bwd[k] for k in keys]
    assert torch.autograd.gradgradcheck(fn, args)


# ---- gradient penalties against torch.nn --------------------------------------------------

def penalty_grads(module, x, hx, mode, lengths, batch_first, device="cpu"):
    """Run a gradient-penalty step on `module` and return every gradient it produced.

    loss1 = random linear function of (y, h_n[, c_n]);
    penalty = |d loss1/d x|^2 + |d loss1/d hx|^2 + sum over parameters |d loss1/d p|^2,
    differentiated by .backward() as a user would. Returns (first-order grads, then the
    .grad of x, hx and every parameter).
    """
    xl = leaf(x, device)
    hl = [leaf(h, device) for h in hx]
    state = None if not hl else (tuple(hl) if len(hl) == 2 else hl[0])
    fast = isinstance(module, fastrnn.modules._RNNBase)
    if mode == "packed" or (mode == "lengths" and not fast):
        packed = pack_padded_sequence(xl, lengths, batch_first=batch_first, enforce_sorted=False)
        y, final = module(packed, state)
        y = pad_packed_sequence(y, batch_first=batch_first, total_length=T)[0]
    elif mode == "lengths":
        y, final = module(xl, state, lengths=lengths.to(device))
    else:
        y, final = module(xl, state)
    outs = [y] + (list(final) if isinstance(final, tuple) else [final])
    g = torch.Generator().manual_seed(3)
    loss1 = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(device)).sum()
                for o in outs)
    params = list(module.parameters())
    inputs = [xl] + hl + params
    first = torch.autograd.grad(loss1, inputs, create_graph=True, allow_unused=True)
    penalty = sum(f.pow(2).sum() for f in first if f is not None)
    penalty.backward()
    return [f.detach() for f in first if f is not None] + [t.grad for t in inputs]


def penalty_cases():
    for kind in KINDS:
        for proj in ([False, True] if kind == "lstm" else [False]):
            for layers, bidir in [(1, False), (2, True)]:
                for mode in ["padded", "batch_first", "lengths", "packed"]:
                    yield pytest.param(kind, proj, layers, bidir, mode, id=(
                        f"{kind}{'-proj' if proj else ''}-L{layers}{'-bi' if bidir else ''}-{mode}"))


@pytest.mark.parametrize("kind,proj,layers,bidir,mode", penalty_cases())
def test_gradient_penalty_matches_torch_nn(kind, proj, layers, bidir, mode):
    torch.manual_seed(zlib.crc32(repr((kind, proj, layers, bidir, mode)).encode()))
    ref_cls, fast_cls, extra = KINDS[kind]
    batch_first = mode == "batch_first"
    kwargs = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first, **extra)
    if proj:
        kwargs["proj_size"] = P
    ref = ref_cls(I, H, dtype=torch.float64, **kwargs)
    fast = fast_cls(I, H, dtype=torch.float64, **kwargs)
    fast.load_state_dict(ref.state_dict())
    D = 2 if bidir else 1
    x = torch.randn(*((B, T) if batch_first else (T, B)), I, dtype=torch.float64)
    hx = [torch.randn(layers * D, B, P if proj else H, dtype=torch.float64)]
    if kind == "lstm":
        hx.append(torch.randn(layers * D, B, H, dtype=torch.float64))
    lengths = torch.tensor([4, T, 2])
    expected = penalty_grads(ref, x, hx, mode, lengths, batch_first)
    actual = penalty_grads(fast, x, hx, mode, lengths, batch_first)
    names = ["x", "h0", "c0"][:1 + len(hx)] + [n for n, _ in ref.named_parameters()]
    n_first = len(expected) - len(names)
    for i, (a, e) in enumerate(zip(actual, expected)):
        what = f"first-order {i}" if i < n_first else f"{names[i - n_first]}.grad"
        assert e is not None, what
        assert a is not None, f"{what} is None where torch.nn has a gradient"
        torch.testing.assert_close(a, e, **F64, msg=lambda m: f"{what}: {m}")


@pytest.mark.skipif(not (torch.cuda.is_available() and fastrnn.ops._C.cuda),
                    reason="needs a CUDA GPU and a CUDA build of fastrnn")
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("mode", ["padded", "lengths"])
def test_gradient_penalty_cuda_matches_torch_nn_cpu(kind, mode):
    """float64 on the GPU against torch.nn's float64 CPU double backward."""
    torch.manual_seed(5)
    ref_cls, fast_cls, extra = KINDS[kind]
    ref = ref_cls(I, H, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    fast = fast_cls(I, H, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    fast.load_state_dict(ref.state_dict())
    fast.cuda()
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = [torch.randn(4, B, H, dtype=torch.float64) for _ in range(2 if kind == "lstm" else 1)]
    lengths = torch.tensor([4, T, 2])
    expected = penalty_grads(ref, x, hx, mode, lengths, False)
    actual = penalty_grads(fast, x, hx, mode, lengths, False, device="cuda")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_gradient_penalty_matches_torch_nn(kind):
    torch.manual_seed(1)
    ref_cls, fast_cls, extra = CELL_KINDS[kind]
    ref = ref_cls(I, H, **extra, dtype=torch.float64)
    fast = fast_cls(I, H, **extra, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    hx = [torch.randn(B, H, dtype=torch.float64) for _ in range(2 if kind == "lstm" else 1)]

    def step(module):
        xl, hl = leaf(x), [leaf(h) for h in hx]
        out = module(xl, tuple(hl) if len(hl) == 2 else hl[0])
        outs = list(out) if isinstance(out, tuple) else [out]
        inputs = [xl] + hl + list(module.parameters())
        first = torch.autograd.grad(sum((o * o.detach().cos()).sum() for o in outs), inputs,
                                    create_graph=True)
        sum(f.pow(2).sum() for f in first).backward()
        return [t.grad for t in inputs]

    for a, e in zip(step(fast), step(ref)):
        torch.testing.assert_close(a, e, **F64)


def test_float32_gradient_penalty_matches_torch_nn():
    torch.manual_seed(2)
    ref = torch.nn.LSTM(I, H, num_layers=2, dtype=torch.float32)
    fast = fastrnn.LSTM(I, H, num_layers=2, dtype=torch.float32)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    got = [penalty_grads(m, x, [], "padded", None, False) for m in (fast, ref)]
    for a, e in zip(*got):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_hessian_vector_product_matches_torch_nn():
    """torch.autograd.functional.hvp w.r.t. the weights of a GRU, as in second-order optimisers."""
    torch.manual_seed(4)
    ref = torch.nn.GRU(I, H, dtype=torch.float64)
    fast = fastrnn.GRU(I, H, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    names = [n for n, _ in ref.named_parameters()]
    params = tuple(p.detach() for p in ref.parameters())
    v = tuple(torch.randn_like(p) for p in params)

    def loss(module):
        def f(*ps):
            y, h = torch.func.functional_call(module, dict(zip(names, ps)), (x,))
            return y.tanh().sum() + h.pow(2).sum()
        return f

    _, hv_ref = torch.autograd.functional.hvp(loss(ref), params, v)
    _, hv_fast = torch.autograd.functional.hvp(loss(fast), params, v)
    for a, e in zip(hv_fast, hv_ref):
        torch.testing.assert_close(a, e, **F64)


# ---- the first-order path, and what cannot be differentiated ------------------------------

def test_first_order_backward_never_recomputes(monkeypatch):
    """Only create_graph=True takes the differentiable (reference) path."""
    def boom(*args, **kwargs):
        raise AssertionError("reference.layer called")

    monkeypatch.setattr(fastrnn.reference, "layer", boom)
    m = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    y.sum().backward(retain_graph=True)  # the fused backward op
    with pytest.raises(AssertionError, match="reference.layer called"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_direct_backward_op_with_grad_is_an_error():
    args = op_args("lstm", 1, torch.tensor([3, 1, 2]))
    y, h_n, c_n, gates, hprev, cprev, m = ops.forward(*args)
    bargs = ("lstm", y, h_n, c_n, args[1], args[4], args[5], None, args[9], gates, hprev,
             cprev, m, False, True)
    with pytest.raises(RuntimeError, match="fastrnn::backward cannot be differentiated.*"
                                           "create_graph=True"):
        ops.backward(*bargs)
    with torch.no_grad():  # the same call is fine where no graph is recorded
        dx = ops.backward(*bargs)[0]
    assert dx.shape == args[1].shape


def test_saved_outputs_are_not_differentiable():
    """The intermediates fastrnn::forward saves carry no gradient, and say so."""
    args = op_args("gru", 1)
    y, h_n, _, gates, hprev, cprev, m = ops.forward(*args)
    assert y.requires_grad and h_n.requires_grad
    assert not any(t.requires_grad for t in (gates, hprev, cprev, m))
    with pytest.raises(RuntimeError, match="does not require grad"):
        gates.sum().backward()
