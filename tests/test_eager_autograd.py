"""The eager path of a layer call that records autograd: fastrnn::autograd_forward, which is
fastrnn::forward with its derivative in C++ (csrc/ops/autograd.cpp). Checked against the
op's registered Python formula (what torch.compile and export trace) and torch.nn: the
same outputs and gradients, bitwise, with the weights stacked [1, ...] or bare (the
parameters themselves), for partial gradients, under saved-tensor hooks and activation
checkpointing, torch.library.opcheck, and that the modules take this path. Double
backward through it is tests/test_double_backward.py's.
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastrnn
from fastrnn import ops

from test_functional import CELLS, op_args

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")


def loss_of(outs, seed=1):
    """A random linear function of every output."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)


def bare(args):
    """op arguments with one direction's weights (w_ih, w_hh, b_ih, b_hh, w_hr) as fresh
    leaves without their [1] axis, as the modules pass their parameters."""
    return args[:4] + tuple(None if t is None else t.detach()[0].requires_grad_()
                            for t in args[4:9]) + args[9:]


def grad_inputs(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("weights", ["stacked", "bare"])
@pytest.mark.parametrize("lengths", [None, [3, 0, 2]], ids=["nolen", "len"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_same_bits_as_the_registered_formula(cell, reverse, lengths, weights):
    proj = 2 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    lens = None if lengths is None else torch.tensor(lengths)
    args = op_args(cell, 1, lens, reverse=reverse, proj=proj)
    want = ops.forward(*args)[:3]  # through the formula registered in ops.py
    want_grads = torch.autograd.grad(loss_of(want), grad_inputs(args))

    got_args = bare(args) if weights == "bare" else args
    got = ops.autograd_forward(*got_args)
    assert "LayerFunction" in got[0].grad_fn.name()
    got_grads = torch.autograd.grad(loss_of(got), grad_inputs(got_args))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    for a, e, t in zip(got_grads, want_grads, grad_inputs(got_args)):
        assert a.shape == t.shape
        torch.testing.assert_close(a, e.view(t.shape), atol=0, rtol=0)


@pytest.mark.parametrize("weights", ["stacked", "bare"])
@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "rnn_relu"])
def test_opcheck(cell, weights):
    """torch.library's checks of the op: schema, autograd registration, fake tensors (its
    CompositeExplicitAutograd kernel takes them to fastrnn::forward's fake kernel) and AOT
    dispatch with dynamic shapes."""
    proj = 2 if cell == "lstm_proj" else 0
    args = op_args(cell.replace("_proj", ""), 1, torch.tensor([3, 1, 2]), proj=proj)
    torch.library.opcheck(ops.autograd_forward, bare(args) if weights == "bare" else args)


@pytest.mark.parametrize("which", ["x", "h0", "w_hh", "b_ih"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_partial_gradients(cell, which):
    """Only the gradient asked for (autograd.grad's inputs) is computed, and it is right."""
    args = bare(op_args(cell, 1, torch.tensor([2, 3, 1])))
    index = {"x": 1, "h0": 2, "w_hh": 5, "b_ih": 6}[which]
    inputs = grad_inputs(args)
    full = torch.autograd.grad(loss_of(ops.autograd_forward(*args)), inputs)
    one, = torch.autograd.grad(loss_of(ops.autograd_forward(*args)), [args[index]])
    k = next(k for k, t in enumerate(inputs) if t is args[index])
    torch.testing.assert_close(one, full[k], atol=0, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_autocast_eager_matches_the_registered_kernels(cell):
    """Under CPU autocast an eager call applies the autocast rule itself (ops._autocast)
    and takes the C++ path; a traced call goes through the op's registered autocast and
    autograd kernels. Both give the same bits, values and gradients."""
    args = tuple(a.detach().float().requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in op_args(cell, 1, torch.tensor([3, 1, 2])))
    eager_args = bare(args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.run_forward(*eager_args)[:3]
        want = ops._forward_stacked(args)[:3]
    assert got[0].dtype == torch.bfloat16
    assert "LayerFunction" in got[0].grad_fn.next_functions[0][0].name()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    got_grads = torch.autograd.grad(loss_of(got), grad_inputs(eager_args))
    want_grads = torch.autograd.grad(loss_of(want), grad_inputs(args))
    for a, e, t in zip(got_grads, want_grads, grad_inputs(eager_args)):
        torch.testing.assert_close(a, e.view(t.shape), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_modules_take_the_cpp_autograd_path(kind):
    m = getattr(fastrnn, kind)(3, 4, num_layers=2, bidirectional=True)
    y, _ = m(torch.randn(5, 2, 3))
    assert "LayerFunction" in y.grad_fn.name()


def test_saved_tensor_hooks_and_checkpointing():
    """The C++ function's saved tensors go through torch's saved-tensor hooks, so
    activation offloading and non-reentrant checkpointing work."""
    torch.manual_seed(0)
    m = fastrnn.LSTM(3, 5, dtype=torch.float64)
    ref = torch.nn.LSTM(3, 5, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)

    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()  # a copy: what the graph holds is what unpack returns

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, (h, c) = m(x)
    assert packed
    y2, _ = checkpoint(m, x, use_reentrant=False)
    want_y, _ = ref(x)
    params = [x] + list(m.parameters())
    for out in (y, y2):
        got = torch.autograd.grad(loss_of([out]), params)
        want = torch.autograd.grad(loss_of([want_y]), [x] + list(ref.parameters()),
                                   retain_graph=True)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=1e-12, rtol=0)


def test_saved_weight_modified_in_place_is_an_error():
    """As for any autograd function: a saved tensor changed before backward is caught."""
    m = fastrnn.GRU(3, 4)
    y, _ = m(torch.randn(5, 2, 3))
    with torch.no_grad():
        m.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def one_step(args):
    """The one-step form of T=1, D=1 op arguments: x [B, I], h0 [B, P], c0 [B, H] and the
    weights without their leading axes, each a fresh leaf, as a cell passes them."""
    def leaf(t):
        return None if t is None else t.detach()[0].requires_grad_(t.requires_grad)

    assert args[1].shape[0] == 1 and args[5].shape[0] == 1
    return (args[0],) + tuple(leaf(t) for t in args[1:9]) + args[9:]


@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_one_step_form_same_bits_and_shapes(cell):
    """A cell's call (x 2-D: one step, one direction) gives the stacked call's bits, y, h_n
    and c_n without their leading axis, and gradients in the inputs' shapes, with no view
    node between the outputs and the C++ function."""
    proj = 2 if cell == "lstm_proj" else 0
    cell = cell.replace("_proj", "")
    args = op_args(cell, 1, None, proj=proj, T=1)
    want = ops.autograd_forward(*args)
    want_grads = torch.autograd.grad(loss_of(want), grad_inputs(args))

    step_args = one_step(args)
    got = ops.autograd_forward(*step_args)
    for a, e in zip(got, want):
        if e.numel():
            assert a.shape == e.shape[1:] and a.grad_fn.name().endswith("LayerFunction>")
        torch.testing.assert_close(a, e.view(a.shape), atol=0, rtol=0)
    got_grads = torch.autograd.grad(loss_of(got), grad_inputs(step_args))
    for a, e, t in zip(got_grads, want_grads, grad_inputs(step_args)):
        assert a.shape == t.shape
        torch.testing.assert_close(a, e.view(t.shape), atol=0, rtol=0)


@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "rnn_tanh"])
def test_opcheck_one_step_form(cell):
    proj = 2 if cell == "lstm_proj" else 0
    args = one_step(op_args(cell.replace("_proj", ""), 1, None, proj=proj, T=1))
    torch.library.opcheck(ops.autograd_forward, args)


def test_one_step_form_needs_bare_weights():
    args = op_args("lstm", 1, None, T=1)
    step = one_step(args)
    with pytest.raises(RuntimeError, match="one-step call .* takes c0 \\[B, H\\]"):
        ops.autograd_forward(*(step[:4] + args[4:]))  # stacked weights
    with pytest.raises(RuntimeError, match="one-step call"):
        ops.autograd_forward(*(step[:3] + args[3:4] + step[4:]))  # c0 with its axis
    with pytest.raises(RuntimeError, match="x must be 3-D"):  # a layer call's x of 2-D
        ops.autograd_forward(*(step[:2] + args[2:3] + step[3:]))


def test_nothing_recorded_without_a_gradient():
    """No input needs a gradient, or grad mode is off: the plain call (no node, nothing
    saved), with the recorded call's values."""
    args = one_step(op_args("lstm", 1, None, T=1))
    want = ops.autograd_forward(*args)
    with torch.no_grad():
        got = ops.autograd_forward(*args)
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    for out in (got, ops.autograd_forward(*detached)):
        for a, e in zip(out, want):
            assert a.grad_fn is None and not a.requires_grad
            torch.testing.assert_close(a, e, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_take_the_one_step_form(kind):
    """A cell's outputs come straight from the C++ function, which saves none of them, so
    they may be changed in place afterwards (torch.nn's RNNCell saves its tanh's output and
    refuses that): the gradients are torch.nn's for the same values."""
    torch.manual_seed(0)
    fast = getattr(fastrnn, kind)(3, 4, dtype=torch.float64)
    ref = getattr(torch.nn, kind)(3, 4, dtype=torch.float64)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    h = torch.randn(2, 4, dtype=torch.float64)
    hx = (h, h.cos()) if kind == "LSTMCell" else h

    def run(m, in_place):
        xl = x.clone().requires_grad_()
        out = m(xl, hx)
        out = out if isinstance(out, tuple) else (out,)
        first = out[0].mul_(2) if in_place else out[0] * 2
        grads = torch.autograd.grad(loss_of((first,) + out[1:]), [xl] + list(m.parameters()))
        return first.grad_fn, grads

    node, got = run(fast, in_place=True)
    assert node.next_functions[0][0].name().endswith("LayerFunction>")
    _, want = run(ref, in_place=False)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0)
