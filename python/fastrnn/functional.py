"""Functional API: one fused layer, time-major; ``lstm``/``gru``/``rnn`` run one direction,
``layer`` runs both directions of a bidirectional layer concurrently.

Shapes: x [T, B, I]; h0 [B, P] (P = proj_size, else H); c0 [B, H]; weights and biases
as in torch.nn (biases may be None). ``lengths`` is an optional int64 tensor [B], any
order: steps t >= lengths[b] keep the state and output zeros, h_n/c_n are each
sequence's state at its own last step, and ``reverse=True`` starts each sequence at its
own last valid step (PackedSequence semantics).
"""
import torch

from . import ops


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


def layer(cell, x, h0, c0, weights, lengths=None, reverse=False):
    """All directions of one layer in one fused call; the directions run concurrently.

    cell: 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'. x [T, B, I]; h0 [D, B, P]; c0 [D, B, H]
    (LSTM only, else None); weights: one (w_ih, w_hh, b_ih, b_hh, w_hr) tuple per
    direction (biases and w_hr may be None). Direction 1 runs reversed (bidirectional).
    Returns (y [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or None).
    """
    if len(weights) == 1:  # the common case, without the generic stacking
        w_ih, w_hh, b_ih, b_hh, w_hr = (None if t is None else t.unsqueeze(0) for t in weights[0])
    else:
        w_ih, w_hh, b_ih, b_hh, w_hr = (_stack(list(ws)) for ws in zip(*weights))
    y, h_n, c_n, *_ = ops.forward(
        cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _lengths(lengths, x), reverse,
        _save(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    return y, h_n, (c_n if cell == "lstm" else None)


def _direction(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    # The one-direction API takes torch.nn's 2-D/1-D shapes; check ranks here so errors
    # name them rather than the stacked [1, ...] shapes the op sees.
    for name, t, dim in [("h0", h0, 2), ("c0", c0, 2), ("w_ih", w_ih, 2), ("w_hh", w_hh, 2),
                         ("b_ih", b_ih, 1), ("b_hh", b_hh, 1), ("w_hr", w_hr, 2)]:
        if t is not None and t.dim() != dim:
            raise RuntimeError(f"fastrnn: {name} must be {dim}-D, got {t.dim()}-D with shape "
                               f"{list(t.shape)}")
    y, h_n, c_n = layer(cell, x, h0.unsqueeze(0), None if c0 is None else c0.unsqueeze(0),
                        [(w_ih, w_hh, b_ih, b_hh, w_hr)], lengths, reverse)
    return y, h_n[0], (None if c_n is None else c_n[0])


def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, w_hr=None):
    """LSTM layer (gates i, f, g, o). ``w_hr`` [P, H] is torch.nn.LSTM's projection."""
    return _direction("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False):
    """GRU layer (gates r, z, n; b_hn inside the reset product, as torch.nn.GRU)."""
    return _direction("gru", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse)[:2]


def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", lengths=None, reverse=False):
    """Elman RNN layer with ``nonlinearity`` 'tanh' or 'relu'."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return _direction("rnn_" + nonlinearity, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths,
                      reverse)[:2]
