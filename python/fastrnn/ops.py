"""Python side of the ``torch.ops.fastrnn`` ops: fake (meta) kernels, autograd, autocast.

The native library registers the schemas and the CPU/CUDA kernels; shapes for tracing
and the backward formula's wiring live here, so ``torch.library.opcheck`` and
``torch.compile(fullgraph=True)`` see complete ops. Eager layer calls that record
autograd take ``autograd_forward`` instead (the same formula in C++, csrc/ops/autograd.cpp,
for a smaller fixed cost); ``run_forward`` chooses (see ``_run``).

``forward`` runs all directions (D = 1 or 2) of one layer at once. Per-direction
arguments are stacked on a leading [D] axis: w_ih [D, G*H, I], w_hh [D, G*H, P],
b_ih/b_hh [D, G*H], w_hr [D, P, H], h0 [D, B, P], c0 [D, B, H]. Direction d runs
reversed when ``reverse != (d == 1)``. ``resets`` (optional, bool [T, B], shared by the
directions) marks the steps that start a new episode: the state entering such a step
(in a reverse direction, the step before it in time) is h0/c0 again. ``zoneout_h``
[D, T, B, P] and ``zoneout_c`` [D, T, B, H] (LSTM; both or neither) are zoneout's weights
of the previous state: state_t = z * state_{t-1} + (1 - z) * cell output, and y_t = h_t.
``rec_mask`` [D, B, P] (recurrent dropout) multiplies the h that feeds W_hh at every
step. y is [T, B, D*P] with the directions side by side, h_n/c_n are [D, B, *], and the
saved tensors are [D, T, B, *].
"""
import torch

from . import _C  # loads the native library, registering torch.ops.fastrnn
from . import reference

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_SAVED = {"lstm": 4, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}

forward = torch.ops.fastrnn.forward.default
autograd_forward = torch.ops.fastrnn.autograd_forward.default  # forward + C++ autograd
backward = torch.ops.fastrnn.backward.default
ln_forward = torch.ops.fastrnn.ln_forward.default
ln_backward = torch.ops.fastrnn.ln_backward.default
mm = torch.ops.fastrnn.mm.default
_LN_SAVED = {"lstm": 5, "gru": 3}  # cells.h: LnLstm, LnGru
_impl_lib = torch.library.Library("fastrnn", "IMPL")  # kernels written in Python


def _check_like_x(x, **tensors):
    # The native kernels check this too; a meta tensor among CPU inputs would route the
    # call here instead, so the fake kernel repeats the device and dtype checks.
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"fastrnn: {name} is on {t.device} but input x is on {x.device}")
        if name not in ("lengths", "resets") and t.dtype != x.dtype:
            raise RuntimeError(f"fastrnn: {name} has dtype {t.dtype} but input x has dtype {x.dtype}")


@torch.library.register_fake("fastrnn::forward")
def _forward_fake(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save,
                  resets=None, zoneout_h=None, zoneout_c=None, rec_mask=None, bf16_gemms=False):
    _check_like_x(x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr,
                  lengths=lengths, resets=resets, zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                  rec_mask=rec_mask)
    T, B, _ = x.shape
    D, GH, P = w_hh.shape
    H = GH // _GATES[cell]
    lstm = cell == "lstm"

    def maybe(cond, *shape):
        return x.new_empty(shape if cond else (0,))

    return (
        x.new_empty((T, B, D * P)),
        x.new_empty((D, B, P)),
        maybe(lstm, D, B, H),
        maybe(save, D, T, B, _SAVED[cell] * H),
        maybe(save, D, T, B, P),
        maybe(save and lstm, D, T, B, H),
        maybe(save and w_hr is not None, D, T, B, H),
    )


@torch.library.register_fake("fastrnn::backward")
def _backward_fake(cell, dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, lengths, gates, hprev, cprev, m,
                   reverse, input_grad, resets=None, zoneout_h=None, zoneout_c=None,
                   rec_mask=None, bf16_gemms=False):
    T, B, _ = x.shape
    D, GH, P = w_hh.shape
    H = GH // _GATES[cell]

    def maybe(cond, *shape):
        return x.new_empty(shape if cond else (0,))

    return (
        maybe(input_grad, *x.shape),
        x.new_empty((D, B, P)),
        maybe(cell == "lstm", D, B, H),
        x.new_empty(w_ih.shape),
        x.new_empty(w_hh.shape),
        x.new_empty((D, GH)),
        x.new_empty((D, GH)),
        maybe(w_hr is not None, *(w_hr.shape if w_hr is not None else (0,))),
    )


@torch.library.register_fake("fastrnn::ln_forward")
def _ln_forward_fake(cell, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b,
                     lengths, reverse, save, eps, resets=None, zoneout_h=None, zoneout_c=None,
                     rec_mask=None):
    _check_like_x(gx, h0=h0, c0=c0, w_hh=w_hh, b_hh=b_hh, ln_w=ln_w, ln_b=ln_b, lnc_w=lnc_w,
                  lnc_b=lnc_b, gx_w=gx_w, gx_b=gx_b, lengths=lengths, resets=resets,
                  zoneout_h=zoneout_h, zoneout_c=zoneout_c, rec_mask=rec_mask)
    T, B, _ = gx.shape
    D, _, H = w_hh.shape
    lstm = cell == "lstm"

    def maybe(cond, *shape):
        return gx.new_empty(shape if cond else (0,))

    return (gx.new_empty((T, B, D * H)), gx.new_empty((D, B, H)), maybe(lstm, D, B, H),
            maybe(save, D, T, B, _LN_SAVED[cell] * H), maybe(save, D, T, B, H),
            maybe(save and lstm, D, T, B, H), maybe(save, D, T, B, 2))


@torch.library.register_fake("fastrnn::ln_backward")
def _ln_backward_fake(cell, dy, dh_n, dc_n, gx, gx_w, gx_b, w_hh, b_hh, ln_w, ln_b, lnc_w,
                      lnc_b, lengths, gates, hprev, cprev, ln_rstd, reverse, resets=None,
                      zoneout_h=None, zoneout_c=None, rec_mask=None):
    D, GH, H = w_hh.shape
    B = gx.shape[1]
    lstm = cell == "lstm"

    def maybe(cond, *shape):
        return gx.new_empty(shape if cond else (0,))

    return (gx.new_empty(gx.shape), gx.new_empty((D, B, H)), maybe(lstm, D, B, H),
            gx.new_empty(w_hh.shape), gx.new_empty((D, GH)), gx.new_empty((D, GH)),
            maybe(lstm, D, H), maybe(lstm, D, H), gx.new_empty((D, GH)), gx.new_empty((D, GH)))


@torch.library.register_fake("fastrnn::mm")
def _mm_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[1]))


def _mm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mm_backward(ctx, grad):
    # fastrnn::mm again, so the gradients are differentiable to any order.
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad
    return (mm(grad, b.t()) if need_a else None), (mm(a.t(), grad) if need_b else None)


torch.library.register_autograd("fastrnn::mm", _mm_backward, setup_context=_mm_setup_context)


def _setup_context(ctx, inputs, output):
    cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, *rest = inputs
    extra = (list(rest) + [None] * 4)[:4]  # resets, zoneout_h, zoneout_c, rec_mask
    ctx.bf16_gemms = bool(rest[4]) if len(rest) > 4 else False
    _, _, _, gates, hprev, cprev, m = output
    # The inputs are kept (references, no copies) for the second-order path below.
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                          gates, hprev, cprev, m, *extra)
    ctx.num_inputs = len(inputs)
    ctx.cell, ctx.reverse = cell, reverse
    # Intermediates kept for the backward, not functions to differentiate: no gradient
    # flows back through them, and autograd says so (requires_grad=False).
    ctx.mark_non_differentiable(gates, hprev, cprev, m)
    ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients


def _backward(ctx, dy, dh_n, dc_n, *_saved_grads):
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        return _differentiable_backward(ctx, dy, dh_n, dc_n)
    x, _, _, w_ih, w_hh, _, _, w_hr, lengths, gates, hprev, cprev, m, *extra = ctx.saved_tensors
    need = ctx.needs_input_grad  # (cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ...)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = backward(
        ctx.cell, dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, lengths, gates, hprev, cprev, m,
        ctx.reverse, need[1], *extra, ctx.bf16_gemms)
    lstm = ctx.cell == "lstm"
    grads = (None, dx if need[1] else None, dh0, dc0 if lstm else None, dw_ih, dw_hh,
             db_ih if need[6] else None, db_hh if need[7] else None,
             dw_hr if w_hr is not None else None)
    return (grads + (None,) * 8)[:ctx.num_inputs]


def _differentiable_backward(ctx, dy, dh_n, dc_n):
    """The first-order gradients as a graph of differentiable torch ops, for double backward
    (see _gradient_graph)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, *_, resets, zh, zc, rm = ctx.saved_tensors
    grads = _gradient_graph(ctx.cell, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), lengths,
                            ctx.reverse, (resets, zh, zc, rm), (dy, dh_n, dc_n),
                            ctx.needs_input_grad[1:9])
    return ((None, *grads) + (None,) * 8)[:ctx.num_inputs]


def _gradient_graph(cell, inputs, lengths, reverse, extra, grad_outputs, need):
    """The gradients of fastrnn::forward's outputs (y, h_n, c_n) with respect to ``inputs``
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr; None where ``need`` is false or the input has
    no effect), as a graph of differentiable torch ops.

    fastrnn::backward has no derivative of its own. When a graph of the gradients is asked
    for (create_graph=True: gradient penalties, Hessian-vector products, MAML), the layer
    is recomputed by the per-step reference (``reference.layer``), whose autograd graph is
    differentiable to any order, and differentiated with create_graph=True. The cost is
    that of torch's own per-step loop, paid only when create_graph is set; first-order
    backward never comes here.
    """
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
    resets, zh, zc, rm = extra
    wanted = [t for t, n in zip(inputs, need) if n]
    pick = lambda t, d: None if t is None else t[d]  # noqa: E731
    weights = [tuple(pick(t, d) for t in (w_ih, w_hh, b_ih, b_hh, w_hr))
               for d in range(w_hh.shape[0])]
    outs = reference.layer(cell, x, h0, c0, weights, lengths, reverse, resets=resets,
                           zoneout_h=zh, zoneout_c=zc, rec_mask=rm)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o is not None and g is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                   create_graph=True, allow_unused=True)
               if pairs and wanted else [None] * len(wanted))
    return tuple(next(got) if n else None for n in need)


def _grad_graph_kernel(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, resets,
                       zoneout_h, zoneout_c, rec_mask, dy, dh_n, dc_n, need):
    """fastrnn::grad_graph (the double-backward path of fastrnn::autograd_forward's C++
    backward): _gradient_graph, with zeros for a needed gradient that is nil and empty
    tensors for the others (an op returns no None)."""
    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    grads = _gradient_graph(cell, inputs, lengths, reverse,
                            (resets, zoneout_h, zoneout_c, rec_mask), (dy, dh_n, dc_n),
                            [bool(n) for n in need])
    return [g if g is not None else torch.zeros_like(t) if n else x.new_empty(0)
            for g, t, n in zip(grads, inputs, need)]


_impl_lib.impl("grad_graph", _grad_graph_kernel, "CompositeImplicitAutograd")

torch.library.register_autograd("fastrnn::forward", _backward, setup_context=_setup_context)


# fastrnn::ln_forward's inputs: (cell, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b,
# gx_w, gx_b, lengths, reverse, save, eps, resets, zoneout_h, zoneout_c, rec_mask).
def _ln_setup_context(ctx, inputs, output):
    (cell, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths, reverse, save,
     eps, *rest) = inputs
    extra = (list(rest) + [None] * 4)[:4]  # resets, zoneout_h, zoneout_c, rec_mask
    _, _, _, gates, hprev, cprev, ln_rstd = output
    ctx.save_for_backward(gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths,
                          gates, hprev, cprev, ln_rstd, *extra)
    ctx.num_inputs = len(inputs)
    ctx.cell, ctx.reverse, ctx.eps = cell, reverse, eps
    ctx.mark_non_differentiable(gates, hprev, cprev, ln_rstd)
    ctx.set_materialize_grads(False)


def _ln_backward(ctx, dy, dh_n, dc_n, *_saved_grads):
    (gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths, gates, hprev, cprev,
     ln_rstd, *extra) = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: recompute by the reference (see above)
        inputs = (gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b)
        wanted = [t for t, n in zip(inputs, need[1:12]) if n]
        outs = reference.ln_recurrence(ctx.cell, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w,
                                       lnc_b, gx_w, gx_b, lengths, ctx.reverse, ctx.eps, *extra)
        pairs = [(o, g) for o, g in zip(outs, (dy, dh_n, dc_n))
                 if o is not None and g is not None]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                       create_graph=True, allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
        grads = (None, *(next(got) if n else None for n in need[1:12]))
    else:
        dgx, dh0, dc0, dw_hh, db_hh, dln_w, dlnc_w, dlnc_b, dgx_w, dgx_b = ln_backward(
            ctx.cell, dy, dh_n, dc_n, gx, gx_w, gx_b, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b,
            lengths, gates, hprev, cprev, ln_rstd, ctx.reverse, *extra)
        lstm = ctx.cell == "lstm"
        grads = (None, dgx, dh0, dc0 if lstm else None, dw_hh, db_hh if need[5] else None,
                 dln_w, db_hh if need[7] else None, dlnc_w if lstm else None,
                 dlnc_b if lstm else None, dgx_w, dgx_b)
    return (grads + (None,) * 8)[:ctx.num_inputs]


torch.library.register_autograd("fastrnn::ln_forward", _ln_backward,
                                setup_context=_ln_setup_context)


def _eager_function(op, setup_context, backward_fn):
    """op with the formula registered above, as an autograd.Function for plain eager calls:
    the registered wrapper re-fills the schema's default arguments on every call (about
    40 us for these schemas, most of a small layer's Python cost); this one skips that."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):  # with ctx, not setup_context: apply skips a signature bind
            with torch._C._AutoDispatchBelowAutograd():  # grad is off here: skip the op's
                out = op(*args)                          # autograd kernel, to the backend
            setup_context(ctx, args, out)
            return out

        backward = staticmethod(backward_fn)

    return Function


_LnForward = _eager_function(ln_forward, _ln_setup_context, _ln_backward)


def _run(name, args, grad, traced, recorded, plain):
    """One of three calls of fastrnn::<name> on args. Under tracing (torch.compile, export)
    or a functorch transform: traced(args), the op through its registered autograd (and
    autocast) kernels. In eager mode, under autocast for x's device, the autocast rule below
    first (_autocast, as the op's autocast kernel would); then, when a gradient can flow
    (grad, or worked out from args): recorded(*args), the op with its autograd (C++ for
    fastrnn::forward, _eager_function for ln_forward); else plain(*args) below autograd,
    straight to the kernel (under torch.no_grad the registered autograd wrapper would still
    run its Python, about 8 us a call)."""
    if plain_eager():
        return _run_eager(args, grad, recorded, plain)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return traced(args)
    if torch._C._is_any_autocast_enabled():
        device = args[1].device.type
        if torch.is_autocast_enabled(device):
            if device not in _AUTOCAST_KEYS:
                return traced(args)
            args, kwargs, finish = _autocast(device, name, args)
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS[device]):
                return finish(_run_eager(args, grad, recorded, plain, kwargs))
    return _run_eager(args, grad, recorded, plain)


def plain_eager():
    """Whether a call runs eagerly, outside autocast and functorch transforms: then
    fastrnn::autograd_forward takes float32/float64 arguments as they are (see _run)."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch._C._is_any_autocast_enabled())


def _run_eager(args, grad, recorded, plain, kwargs=None):
    kwargs = kwargs or {}
    if grad is None:
        grad = torch.is_grad_enabled() and any(a.requires_grad for a in args
                                               if isinstance(a, torch.Tensor))
    if grad:
        return recorded(*args, **kwargs)
    with torch._C._AutoDispatchBelowAutograd():
        return plain(*args, **kwargs)


def _forward_stacked(args):
    """fastrnn::forward on args, one direction's bare weights (w_ih, w_hh, b_ih, b_hh, w_hr:
    w_hh 2-D) given their leading [1] axis."""
    if args[5].dim() == 2:
        args = args[:4] + tuple(None if t is None else t.unsqueeze(0) for t in args[4:9]) + \
            args[9:]
    return forward(*args)


def _ln_forward_traced(args):
    return ln_forward(*args)


def run_forward(*args, grad=None):
    """fastrnn::forward(*args), see _run; y, h_n and c_n come first. One direction's weights
    may come bare, without their leading [1] axis: autograd_forward takes them so, which
    spares autograd a view node for each. grad: whether a gradient can flow, if the caller
    knows (else it is worked out from args)."""
    return _run("forward", args, grad, _forward_stacked, autograd_forward, autograd_forward)


def run_ln_forward(*args):
    """fastrnn::ln_forward(*args), see _run."""
    return _run("ln_forward", args, None, _ln_forward_traced, _LnForward.apply, ln_forward)


# Autocast. The CPU kernels compute in float32 or float64 only, so under CPU autocast
# the op runs in float32 (float32/bfloat16/float16 inputs are cast up) and y, h_n and c_n
# come back in the autocast dtype, as torch.nn.LSTM's do there; the state and the gate
# math stay float32. Under bfloat16 autocast on a CPU with bf16 dot products
# (AVX512_BF16 or AMX-BF16, from its feature flags), fastrnn::forward's large GEMMs
# (input projection, dx, weight gradients) take bfloat16 operands, as torch's autocast
# matmuls do (bf16_gemms), and so may its recurrent products (the kernels' bf16 step:
# recurrence.h's bf16_products). Under CUDA autocast the inputs are cast to the autocast dtype
# and the kernels run in it, as cuDNN's RNNs do. float64 tensors are left as they are on
# both, as autocast does for torch's own ops. Saved-for-backward outputs stay in the
# compute dtype; gradients reach the parameters in their own dtype through the casts.
_BF16_DOT = bool({"avx512_bf16", "amx_bf16"} & set(_C.cpu_features()))


_AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 is left alone


def _autocast(device_type, name, args):
    """The rule above for a call of fastrnn::<name> on args, autocast being on for
    device_type: (the arguments and keyword arguments to run the op with, a function of its
    outputs that gives the call's). (A traced call's args may stop before the defaults.)"""
    out_dtype = torch.get_autocast_dtype(device_type)
    run_dtype = torch.float32 if device_type == "cpu" else out_dtype

    def eligible(t):
        return (isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_DTYPES
                and t.device.type == device_type)

    kwargs = {}
    if not eligible(args[1]):  # x (gx): float64, or on another device
        return args, kwargs, _same
    # (a cast to the dtype a tensor has already costs a call: those are left out)
    args = tuple(a.to(run_dtype) if isinstance(a, torch.Tensor) and a.dtype != run_dtype
                 and eligible(a) else a for a in args)
    if name == "forward" and device_type == "cpu" and out_dtype == torch.bfloat16 \
            and _BF16_DOT:
        args, kwargs = args[:16], {"bf16_gemms": True}  # the schema's 17th argument
    if run_dtype == out_dtype:
        return args, kwargs, _same
    return args, kwargs, lambda out: tuple(t.to(out_dtype) for t in out[:3]) + tuple(out[3:])


def _same(out):
    return out


_AUTOCAST_KEYS = {}  # device type -> the DispatchKeySet of its autocast key


def _register_autocast(device_type, name, op):
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    _AUTOCAST_KEYS[device_type] = exclude

    def kernel(_keyset, *args):
        args, kwargs, finish = _autocast(device_type, name, args)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return finish(op(*args, **kwargs))

    _impl_lib.impl(name, kernel, key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    if torch.amp.is_autocast_available(_device_type):
        _register_autocast(_device_type, "forward", forward)
        _register_autocast(_device_type, "ln_forward", ln_forward)
