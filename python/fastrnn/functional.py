"""Functional API: one fused layer, time-major; ``lstm``/``gru``/``rnn`` run one direction,
``layer`` runs both directions of a bidirectional layer concurrently.

Shapes: x [T, B, I]; h0 [B, P] (P = proj_size, else H); c0 [B, H]; weights and biases
as in torch.nn (biases may be None). ``lengths`` is an optional int64 tensor [B], any
order: steps t >= lengths[b] keep the state and output zeros, h_n/c_n are each
sequence's state at its own last step, and ``reverse=True`` starts each sequence at its
own last valid step (PackedSequence semantics). ``resets`` is an optional bool tensor
[T, B]: where ``resets[t, b]`` is set, step t of row b starts a new episode, so the state
entering it is ``h0``/``c0`` again; a reverse direction starts afresh at step t - 1 instead
(the step it runs after the flagged one), so every episode is processed on its own in
both directions. Flags at padded steps are ignored. ``zoneout_h`` [T, B, P] and, for
``lstm``, ``zoneout_c`` [T, B, H] (``layer``: [D, T, B, *]) are zoneout's weights z of
each unit's previous state: h_t = z * h_{t-1} + (1 - z) * (the cell's new h), the same
for c, and the output is h_t (z is 0 or 1 in training, p in eval; the modules draw them).
``rec_mask`` [B, P] (``layer``: [D, B, P]), recurrent dropout: the h that feeds ``w_hh``
is h * rec_mask at every step (0 or 1/(1-p) in training); the output is not masked.
"""
import functools

import torch

from . import ops


_HALF = (torch.bfloat16, torch.float16)


def _float32(obj):
    """obj with every bfloat16/float16 tensor in it (through tuples and lists) as float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in _HALF else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float32(o) for o in obj)
    return obj


_SCALAR_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                 torch.bfloat16: "BFloat16"}


def _half_on_cpu(x):
    """A bfloat16/float16 input on the CPU outside autocast (under autocast the op's own
    autocast kernel casts every argument to float32)."""
    return x.dtype in _HALF and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def _on_cpu_in_float32(fn, x, named, *args, **kwargs):
    """fn(x, *args, **kwargs) for bfloat16/float16 input on the CPU, whose kernels compute
    in float32: the floating-point arguments go in as float32 (exactly) and y, h_n, c_n
    come back in x's dtype, so state, gate math and GEMM accumulation stay in float32.
    Autograd carries the gradients back through the casts, to each tensor in its dtype.
    named: (name, tensor) pairs that must have x's dtype, checked first, so that an error
    names the dtypes the caller gave (the op's own check would see float32)."""
    for name, t in named:
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"fastrnn: {name} has dtype {_SCALAR_NAMES.get(t.dtype, t.dtype)}"
                               f" but input x has dtype {_SCALAR_NAMES[x.dtype]}")
    outs = fn(_float32(x), *_float32(args), **{k: _float32(v) for k, v in kwargs.items()})
    return tuple(None if o is None else o.to(x.dtype) for o in outs)


def _save(*tensors):
    # Keep what backward needs only when a gradient can flow.
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lengths(lengths, x):
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"fastrnn: lengths must be an integer tensor, got {lengths.dtype}")
    return lengths.to(device=x.device, dtype=torch.int64)


def _stack(tensors):
    # One direction: a view; two: the [D, ...] stack the op takes (autograd splits it back).
    if tensors[0] is None:
        return None
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def layer(cell, x, h0, c0, weights, lengths=None, reverse=False, *, resets=None,
          zoneout_h=None, zoneout_c=None, rec_mask=None):
    """All directions of one layer in one fused call; the directions run concurrently.

    cell: 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'. x [T, B, I]; h0 [D, B, P]; c0 [D, B, H]
    (LSTM only, else None); weights: one (w_ih, w_hh, b_ih, b_hh, w_hr) tuple per
    direction (biases and w_hr may be None). Direction 1 runs reversed (bidirectional).
    resets: optional bool [T, B] episode starts; zoneout_h [D, T, B, P], zoneout_c
    [D, T, B, H]: optional zoneout weights; rec_mask [D, B, P]: optional recurrent dropout
    mask (see the module docstring).
    Returns (y [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or None).
    """
    if _half_on_cpu(x):
        names = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
        named = [("h0", h0), ("c0", c0)] + [(n, w) for ws in weights for n, w in zip(names, ws)]
        # A bfloat16 model's large GEMMs take bfloat16 operands where the CPU has bf16 dot
        # products, as under bf16 autocast.
        return _on_cpu_in_float32(
            functools.partial(_layer, cell, bf16_gemms=x.dtype == torch.bfloat16 and
                              ops._BF16_DOT),
            x, named, h0, c0, weights, lengths, reverse, resets, zoneout_h, zoneout_c,
            rec_mask)
    return _layer(cell, x, h0, c0, weights, lengths, reverse, resets, zoneout_h, zoneout_c,
                  rec_mask)


def _layer(cell, x, h0, c0, weights, lengths, reverse, resets, zoneout_h, zoneout_c, rec_mask,
           bf16_gemms=False):
    if len(weights) == 1:  # one direction: as they are (ops.run_forward stacks them)
        w_ih, w_hh, b_ih, b_hh, w_hr = weights[0]
    else:
        w_ih, w_hh, b_ih, b_hh, w_hr = (_stack(list(ws)) for ws in zip(*weights))
    save = _save(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    args = (cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _lengths(lengths, x), reverse, save,
            resets, zoneout_h, zoneout_c, rec_mask) + ((True,) if bf16_gemms else ())
    y, h_n, c_n, *_ = ops.run_forward(*args, grad=save)
    return y, h_n, (c_n if cell == "lstm" else None)


def _direction(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, resets,
               zoneout_h=None, zoneout_c=None, rec_mask=None):
    # The one-direction API takes torch.nn's 2-D/1-D shapes; check ranks here so errors
    # name them rather than the stacked [1, ...] shapes the op sees.
    for name, t, dim in [("h0", h0, 2), ("c0", c0, 2), ("w_ih", w_ih, 2), ("w_hh", w_hh, 2),
                         ("b_ih", b_ih, 1), ("b_hh", b_hh, 1), ("w_hr", w_hr, 2)]:
        if t is not None and t.dim() != dim:
            raise RuntimeError(f"fastrnn: {name} must be {dim}-D, got {t.dim()}-D with shape "
                               f"{list(t.shape)}")
    y, h_n, c_n = layer(cell, x, h0.unsqueeze(0), None if c0 is None else c0.unsqueeze(0),
                        [(w_ih, w_hh, b_ih, b_hh, w_hr)], lengths, reverse, resets=resets,
                        zoneout_h=None if zoneout_h is None else zoneout_h.unsqueeze(0),
                        zoneout_c=None if zoneout_c is None else zoneout_c.unsqueeze(0),
                        rec_mask=None if rec_mask is None else rec_mask.unsqueeze(0))
    return y, h_n[0], (None if c_n is None else c_n[0])


def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, w_hr=None, *,
         resets=None, zoneout_h=None, zoneout_c=None, rec_mask=None):
    """LSTM layer (gates i, f, g, o). ``w_hr`` [P, H] is torch.nn.LSTM's projection."""
    return _direction("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, resets,
                      zoneout_h, zoneout_c, rec_mask)


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, *, resets=None,
        zoneout_h=None, rec_mask=None):
    """GRU layer (gates r, z, n; b_hn inside the reset product, as torch.nn.GRU)."""
    return _direction("gru", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse,
                      resets, zoneout_h, None, rec_mask)[:2]


def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", lengths=None, reverse=False, *,
        resets=None, zoneout_h=None, rec_mask=None):
    """Elman RNN layer with ``nonlinearity`` 'tanh' or 'relu'."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return _direction("rnn_" + nonlinearity, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths,
                      reverse, resets, zoneout_h, None, rec_mask)[:2]


def ln_layer(cell, x, h0, c0, weights, lengths=None, reverse=False, *, eps=1e-5, resets=None,
             zoneout_h=None, zoneout_c=None, rec_mask=None):
    """All directions of one LayerNorm LSTM/GRU layer in one fused call.

    cell: 'lstm' or 'gru'. weights: one tuple per direction, (w_ih, w_hh, b_ih, b_hh,
    ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b): for 'lstm' b_ih is the one bias
    [4H] (or None), b_hh is None and ln_c_w/ln_c_b [H] are LN_c's; for 'gru' b_ih/b_hh
    [3H] (or None) and ln_c_* None. LN_ih and LN_hh weights/biases are [G*H]. The math is
    ``fastrnn.reference.ln_lstm`` / ``ln_gru``; other arguments and the result as ``layer``.
    """
    if _half_on_cpu(x):
        names = ("w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_w", "ln_ih_b", "ln_w", "ln_b", "lnc_w",
                 "lnc_b")
        named = [("h0", h0), ("c0", c0)] + [(n, w) for ws in weights for n, w in zip(names, ws)]
        return _on_cpu_in_float32(
            functools.partial(ln_layer, cell), x, named, h0, c0, weights, lengths, reverse,
            eps=eps, resets=resets, zoneout_h=zoneout_h, zoneout_c=zoneout_c, rec_mask=rec_mask)
    w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_w, ln_b, lnc_w, lnc_b = (
        _stack(list(ws)) for ws in zip(*weights))
    T, B, D, GH = x.shape[0], x.shape[1], w_hh.shape[0], w_hh.shape[1]
    # The input parts of every step and direction: one GEMM, then LN_ih (per direction).
    gx = _project(x.reshape(T * B, x.shape[2]), w_ih.reshape(D * GH, w_ih.shape[2]))
    gx = gx.view(T * B, D, GH)
    # LN_ih's affine (and the input bias) is applied inside the op, as it reads gx.
    gx = torch.nn.functional.layer_norm(gx, (GH,), eps=eps)
    gx_b = ln_ih_b if b_ih is None else ln_ih_b + b_ih
    y, h_n, c_n, *_ = ops.run_ln_forward(
        cell, gx.view(T, B, D * GH), h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, ln_ih_w, gx_b,
        _lengths(lengths, x), reverse, _save(x, h0, c0, *[t for ws in weights for t in ws]),
        eps, resets, zoneout_h, zoneout_c, rec_mask)
    return y, h_n, (c_n if cell == "lstm" else None)


def _project(x, w):
    """x [N, I] @ w[G, I]^T: fastrnn's own GEMM on the CPU in float32/float64 (the same
    speed on any vendor's CPU), torch's elsewhere (autocast, other dtypes and devices)."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dtype == w.dtype and not torch.is_autocast_enabled("cpu")):
        return ops.mm(x, w.t())
    return x @ w.t()
