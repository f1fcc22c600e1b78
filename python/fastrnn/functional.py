"""Functional API: one fused layer in one direction, time-major.

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


def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, w_hr=None):
    """LSTM layer (gates i, f, g, o). ``w_hr`` [P, H] is torch.nn.LSTM's projection."""
    y, h_n, c_n, *_ = ops.forward(
        "lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _lengths(lengths, x), reverse,
        _save(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    return y, h_n, c_n


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False):
    """GRU layer (gates r, z, n; b_hn inside the reset product, as torch.nn.GRU)."""
    y, h_n, *_ = ops.forward(
        "gru", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, _lengths(lengths, x), reverse,
        _save(x, h0, w_ih, w_hh, b_ih, b_hh))
    return y, h_n


def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", lengths=None, reverse=False):
    """Elman RNN layer with ``nonlinearity`` 'tanh' or 'relu'."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    y, h_n, *_ = ops.forward(
        "rnn_" + nonlinearity, x, h0, None, w_ih, w_hh, b_ih, b_hh, None,
        _lengths(lengths, x), reverse, _save(x, h0, w_ih, w_hh, b_ih, b_hh))
    return y, h_n
