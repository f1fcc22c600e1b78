"""Drop-in replacements for torch.nn.LSTM/GRU/RNN and their cells.

The modules subclass torch's ``RNNBase`` / ``RNNCellBase`` so that constructor
arguments, argument checks, parameter names, shapes, initialisation,
state_dict, repr and pickling are torch's own. Only ``forward`` is replaced:
it reproduces torch's input handling and error messages, then runs every
layer and direction through ``fastrnn.functional``.

Beyond torch, ``forward`` takes a keyword-only ``lengths=`` for padded input and
``resets=`` for episode boundaries inside a sequence, and the constructors take the
keyword-only ``zoneout=``, ``recurrent_dropout=`` and ``weight_dropout=`` (DropConnect on
``weight_hh``).

``LayerNormLSTM`` / ``LayerNormGRU`` reuse that forward with their own parameters and
``fastrnn.functional.ln_layer`` in place of ``layer``.
"""
import functools
import math
import numbers

import torch
from torch.nn import init
from torch.nn.modules.rnn import RNNBase, RNNCellBase
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional as F
from . import ops

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM",
           "LayerNormGRU"]


def _run_op(mode, x, state, weights, lengths=None, reverse=False):
    """One layer, one direction: the only place that differs by cell type.

    x: [T, B, I]; state: (h,) or (h, c), each [B, *];
    weights: (w_ih, w_hh, b_ih, b_hh, w_hr), biases and w_hr may be None.
    Returns (y [T, B, P], final state tuple).
    """
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    if mode == "LSTM":
        y, h, c = F.lstm(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh,
                         lengths=lengths, reverse=reverse, w_hr=w_hr)
        return y, (h, c)
    if mode == "GRU":
        y, h = F.gru(x, state[0], w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse)
    else:
        nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
        y, h = F.rnn(x, state[0], w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity,
                     lengths=lengths, reverse=reverse)
    return y, (h,)


# torch.nn's mode names -> the cells of torch.ops.fastrnn.
_CELLS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


# The dtypes fastrnn's kernels compute in on every device (half precision on the CPU is
# computed in float32, which the layer path arranges).
_FLOAT = (torch.float32, torch.float64)


# c10 ScalarType names, as torch spells them in its dtype mismatch message.
_DTYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def _check_state_dtype(state, weight):
    # torch fails inside its first matmul (hx @ w_hh.T) with this message.
    for s in state:
        if s.dtype != weight.dtype:
            raise RuntimeError(
                "mat1 and mat2 must have the same dtype, but got "
                f"{_DTYPE_NAMES.get(s.dtype, s.dtype)} and "
                f"{_DTYPE_NAMES.get(weight.dtype, weight.dtype)}"
            )


def _check_devices(input, state, weights):
    # Same checks, order and wording as ATen's check_attributes for RNNs.
    device = input.device
    for name, tensors in (("hidden", state), ("parameter", weights)):
        for t in tensors:
            if t is not None and t.device != device:
                raise RuntimeError(
                    f"Input and {name} tensors are not at the same device, found input "
                    f"tensor at {device} and {name} tensor at {t.device}"
                )


def _check_lengths(lengths, batch, steps, device):
    """Validate the ``lengths=`` extension; returns int64 [B] on ``device``."""
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.numel() != batch:
        raise ValueError(
            f"lengths must be a 1-D tensor with one entry per sequence: expected shape "
            f"[{batch}], got {list(lengths.shape)}"
        )
    # Reading the values is a host sync and, under torch.compile, a graph break; there the
    # kernel's own check of the values (same messages, as RuntimeError) stands in.
    if batch > 0 and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(lengths))  # one sync when on a GPU
        if lo < 0:
            raise ValueError(f"lengths must be non-negative, got {lo}")
        if hi > steps:
            raise ValueError(
                f"lengths must not exceed the sequence length {steps} of the input, got {hi}"
            )
    return lengths.to(device=device, dtype=torch.int64)


def _check_p(name, p):
    """A dropout-style probability in [0, 1), as a float."""
    if isinstance(p, bool) or not isinstance(p, numbers.Number):
        raise ValueError(f"{name} should be a number in range [0, 1) representing the "
                         f"probability of an element being zeroed, got {p!r}")
    if not 0 <= p < 1:
        raise ValueError(f"{name} probability has to be in [0, 1), but got {p}")
    return float(p)


def _check_resets(resets, steps, batch, batch_first, device):
    """Validate the ``resets=`` extension for padded input; returns bool [T, B]."""
    if not isinstance(resets, torch.Tensor):
        raise TypeError(f"resets must be a bool tensor, got {type(resets).__name__}")
    if resets.dtype != torch.bool:
        raise TypeError(f"resets must be a bool tensor, got dtype {resets.dtype}")
    want = [batch, steps] if batch_first else [steps, batch]
    if list(resets.shape) != want:
        layout = "[batch, seq_len] (batch_first)" if batch_first else "[seq_len, batch]"
        raise ValueError(f"resets must have shape {layout} = {want}, like the input's first "
                         f"two dimensions, got {list(resets.shape)}")
    if resets.device != device:
        raise RuntimeError(f"resets is on {resets.device} but the input is on {device}")
    return resets.t() if batch_first else resets


# Packing and unpacking run eagerly under torch.compile: their shapes depend on the
# values of batch_sizes, and some torch versions (2.11) fail to trace torch's own
# _pad_packed_sequence with fake tensors instead of breaking the graph there.
@torch.compiler.disable
def _pad_packed(data, batch_sizes):
    return pad_packed_sequence(PackedSequence(data, batch_sizes))


@torch.compiler.disable
def _pack_padded(y, lengths):
    return pack_padded_sequence(y, lengths).data


class _RNNBase(RNNBase):
    """Shared forward for LSTM, GRU and RNN: one generic layer loop."""

    def __init__(self, mode, *args, zoneout=0.0, recurrent_dropout=0.0, weight_dropout=0.0,
                 **kwargs):
        super().__init__(mode, *args, **kwargs)
        self.zoneout = _check_p("zoneout", zoneout)
        self.recurrent_dropout = _check_p("recurrent_dropout", recurrent_dropout)
        self.weight_dropout = _check_p("weight_dropout", weight_dropout)

    def extra_repr(self):
        s = super().extra_repr()
        for name in ("zoneout", "recurrent_dropout", "weight_dropout"):
            if self.__dict__.get(name, 0):  # absent on modules made by convert()
                s += f", {name}={getattr(self, name)}"
        return s

    def _zoneout_weights(self, x):
        """Zoneout's weights of the previous state for one layer, (z_h [D, T, B, P],
        z_c [D, T, B, H] or None), or (None, None) without zoneout. Training: 1 (keep the
        previous value) with probability p, a fresh draw per step, unit and row from torch's
        default generator on x's device; eval: p everywhere, the expected value."""
        p = self.__dict__.get("zoneout", 0.0)
        if p == 0:
            return None, None
        T, B = x.shape[:2]
        D = 2 if self.bidirectional else 1
        sizes = [self.proj_size or self.hidden_size]
        if self.mode == "LSTM":
            sizes.append(self.hidden_size)
        if self.training:
            zs = [x.new_empty((D, T, B, n)).bernoulli_(p) for n in sizes]
        else:
            zs = [x.new_full((D, T, B, n), p) for n in sizes]
        return zs[0], (zs[1] if len(zs) > 1 else None)

    def _recurrent_mask(self, x):
        """Recurrent dropout's mask for one layer, [D, B, P]: 0 with probability p, else
        1/(1-p), one per sequence, direction and unit, fixed over time (variational); None
        in eval or without it."""
        p = self.__dict__.get("recurrent_dropout", 0.0)
        if not (self.training and p > 0):
            return None
        D = 2 if self.bidirectional else 1
        size = self.proj_size or self.hidden_size
        return x.new_empty((D, x.shape[1], size)).bernoulli_(1 - p).div_(1 - p)

    def flatten_parameters(self):
        """No-op: the fused kernels read the parameters where they are.

        torch's version repacks the weights into one cuDNN buffer, which these
        kernels neither need nor use.
        """

    # The weight tuple of the layer op, one name per entry (None: an entry this class never
    # has); the parameter is "{name}_l{layer}", with "_reverse" for the reverse direction.
    _weight_slots = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")

    def _weight_names(self, present=False):
        """Parameter names per layer and direction, one per entry of ``_weight_slots``
        (None for an entry this class never has); present: None also where this module has
        no such attribute (no bias, no projection)."""
        key = (self.num_layers, self.bidirectional, self.bias, self.proj_size)
        attr = "_fastrnn_present_names" if present else "_fastrnn_names"
        cached = self.__dict__.get(attr)
        if cached is None or cached[0] != key:
            def name(slot, layer, d):
                n = slot and f"{slot}_l{layer}{'_reverse' if d else ''}"
                return n if not present or (n and hasattr(self, n)) else None

            names = [[tuple(name(slot, layer, d) for slot in self._weight_slots)
                      for d in range(2 if self.bidirectional else 1)]
                     for layer in range(self.num_layers)]
            cached = self.__dict__[attr] = (key, names)
        return cached[1]

    def _all_weights_now(self):
        """[layer][direction] -> the layer op's weight tuple (e.g. (w_ih, w_hh, b_ih, b_hh,
        w_hr)), read at call time (None where absent), so weight tying and
        torch.func.functional_call work."""
        params = self._parameters
        names = self._weight_names(present=True)
        try:  # every entry a registered parameter: the common case, made fast
            return [[tuple([params[n] if n else None for n in d]) for d in layer]
                    for layer in names]
        except KeyError:  # some entry is a plain attribute (tied or swapped in), or gone
            return [[tuple(params[n] if n in params else n and getattr(self, n, None)
                           for n in d)
                     for d in layer] for layer in names]

    def _weights_for_call(self):
        """The weights of this call: with ``weight_dropout`` in training, W_hh of every layer
        and direction under a fresh DropConnect mask (scaled by 1/(1-p); torch's default
        generator of the weight's device). The parameters themselves are never modified;
        autograd carries the gradient through the mask."""
        weights = self._all_weights_now()
        p = self.__dict__.get("weight_dropout", 0.0)  # modules pickled before it existed
        if not (self.training and p > 0):
            return weights
        drop = torch.nn.functional.dropout
        return [[(w_ih, drop(w_hh, p, training=True), *rest) for (w_ih, w_hh, *rest) in layer]
                for layer in weights]

    def _zero_state(self, input, batch):
        num_directions = 2 if self.bidirectional else 1
        shape = (self.num_layers * num_directions, batch)
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        opts = {"dtype": input.dtype, "device": input.device}
        if self.mode == "LSTM" and real_hidden == self.hidden_size:
            h = torch.zeros(*shape, real_hidden, **opts)
            return (h, h)  # the kernels only read the initial state: one tensor serves both
        h = torch.zeros(*shape, real_hidden, **opts)
        if self.mode == "LSTM":
            return (h, torch.zeros(*shape, self.hidden_size, **opts))
        return h

    def _check_hx_dim(self, hx, want):
        # torch's messages differ between LSTM (h and c) and GRU/RNN (h only).
        kind = "batched 3-D" if want == 3 else "unbatched 2-D"
        if self.mode == "LSTM":
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
        elif hx.dim() != want:
            raise RuntimeError(
                f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
            )

    def _input_dim_error(self, dim):
        name = "LSTM" if self.mode == "LSTM" else "GRU" if self.mode == "GRU" else "RNN"
        tail = " tensor" if name == "RNN" else ""
        return ValueError(f"{name}: Expected input to be 2D or 3D, got {dim}D{tail} instead")

    def _layer_op(self):
        """The fused op that runs one layer, every direction in one call, with
        ``functional.layer``'s arguments; looked up once per forward, so that a layer costs
        no extra Python call."""
        return F.layer

    def _run_layers(self, x, state, lengths, weights, resets=None):
        """x: [T, B, I]; state: tuple of [L * D, B, *]; weights: [layer][direction] tuples;
        resets: bool [T, B] or None, the same for every layer.
        Each layer runs both directions in one fused call (they run concurrently).
        Returns (y [T, B, D * P], final state tuple shaped like ``state``)."""
        num_directions = 2 if self.bidirectional else 1
        cell = _CELLS[self.mode]
        layer_op = self._layer_op()
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0:
                # torch applies dropout to every layer's output but the last.
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
            s = state if self.num_layers == 1 else tuple(
                t[layer * num_directions:(layer + 1) * num_directions] for t in state)
            zh, zc = self._zoneout_weights(x)
            x, h, c = layer_op(cell, x, s[0], s[1] if cell == "lstm" else None, weights[layer],
                               lengths, resets=resets, zoneout_h=zh, zoneout_c=zc,
                               rec_mask=self._recurrent_mask(x))
            finals.append((h, c) if cell == "lstm" else (h,))
        if self.num_layers == 1:
            return x, finals[0]
        return x, tuple(torch.cat(parts) for parts in zip(*finals))

    def _check_runtime(self, input, hx, weights, own_state=False):
        """Checks torch makes in C++ after the Python shape checks. own_state: hx is the
        zero state made for this call, on the input's device in its dtype."""
        state = hx if self.mode == "LSTM" else (hx,)
        flat = [w for layer in weights for d in layer for w in d if w is not None]
        _check_devices(input, () if own_state else state, flat)
        # As torch's own dtype check. A state made here has the input's dtype, which
        # check_input has compared with the weights'.
        if not own_state and not torch._C._is_any_autocast_enabled():
            _check_state_dtype(state, flat[0])
        return state

    def forward(self, input, hx=None, *, lengths=None, resets=None):
        """As torch.nn's forward; ``lengths`` (padded input only) is an integer
        tensor [B], any device and order, giving each sequence's valid steps.

        ``resets`` is a bool tensor [T, B] ([B, T] with batch_first; [T] for unbatched
        input; a PackedSequence packed like the input for packed input) on the input's
        device: where ``resets[t, b]`` is set, step t of sequence b starts a new episode
        and the state entering it is the initial state again (``hx``, or zeros), in every
        layer. A reverse direction starts afresh at step t - 1, the step it runs after
        the flagged one, so every episode is processed on its own in both directions.
        Flags at padded steps (t >= lengths[b]) are ignored."""
        weights = self._weights_for_call()
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(
                    "lengths= cannot be combined with a PackedSequence input, "
                    "which already carries its lengths"
                )
            return self._forward_packed(input, hx, weights, resets)

        if input.dim() not in (2, 3):
            raise self._input_dim_error(input.dim())
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            # The zero state has the right sizes, device and dtype: only the input and the
            # weights are left to check.
            self.check_input(input, None)
            hx = self._zero_state(input, input.size(batch_dim))
            state = self._check_runtime(input, hx, weights, own_state=True)
        else:
            self._check_hx_dim(hx, 3 if is_batched else 2)
            if not is_batched:
                hx = tuple(h.unsqueeze(1) for h in hx) if self.mode == "LSTM" else hx.unsqueeze(1)
            self.check_forward_args(input, hx, None)
            state = self._check_runtime(input, hx, weights)

        x = input.transpose(0, 1) if self.batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if lengths is not None:
            if not is_batched and torch.as_tensor(lengths).dim() == 0:
                lengths = torch.as_tensor(lengths).reshape(1)  # one sequence, one length
            lengths = _check_lengths(lengths, x.size(1), x.size(0), x.device)
        if resets is not None:
            if not is_batched and isinstance(resets, torch.Tensor) and resets.dim() == 1:
                resets = resets.unsqueeze(batch_dim)  # one sequence
            resets = _check_resets(resets, x.size(0), x.size(1), self.batch_first, x.device)

        y, final = self._run_layers(x, state, lengths, weights, resets)

        if self.batch_first:
            y = y.transpose(0, 1)  # a view, as torch returns
        if not is_batched:
            y = y.squeeze(batch_dim)
            final = tuple(f.squeeze(1) for f in final)
        return y, final if self.mode == "LSTM" else final[0]

    def _forward_packed(self, packed, hx, weights, resets=None):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if hx is None:
            hx = self._zero_state(data, int(batch_sizes[0]))
        else:
            # hx is given in the caller's batch order; the packed data is sorted.
            hx = self.permute_hidden(hx, sorted_indices)
        # torch.nn.LSTM skips these checks for packed input (and can crash); we don't.
        self.check_forward_args(data, hx, batch_sizes)
        state = self._check_runtime(data, hx, weights)

        # Pad once, run with in-kernel lengths, pack once: rows stay in sorted order.
        x, lengths = _pad_packed(data, batch_sizes)
        if resets is not None:
            resets = self._packed_resets(resets, packed, x)
        y, final = self._run_layers(x, state, lengths.to(x.device), weights, resets)
        out = PackedSequence(_pack_padded(y, lengths), batch_sizes, sorted_indices,
                             unsorted_indices)
        hidden = final if self.mode == "LSTM" else final[0]
        return out, self.permute_hidden(hidden, unsorted_indices)


    @staticmethod
    def _packed_resets(resets, packed, x):
        """resets for packed input: bool flags packed exactly like the input (one per
        element of ``packed.data``'s first dimension, same batch_sizes and order), e.g.
        ``pack_padded_sequence(mask, lengths, enforce_sorted=...)`` with the input's
        lengths. Returns them padded, [T, B] in the packed (sorted) row order."""
        if not isinstance(resets, PackedSequence):
            raise TypeError(
                "for a PackedSequence input, resets must be a PackedSequence of bool flags "
                "packed like the input (e.g. pack_padded_sequence(mask, lengths) with the "
                f"input's lengths), got {type(resets).__name__}")
        same_order = (resets.sorted_indices is None) == (packed.sorted_indices is None) and (
            packed.sorted_indices is None
            or torch.equal(resets.sorted_indices.cpu(), packed.sorted_indices.cpu()))
        if (resets.data.dim() != 1 or not torch.equal(resets.batch_sizes, packed.batch_sizes)
                or not same_order):
            raise ValueError(
                "resets must be packed like the input: one flag per step ([N], N = "
                f"{packed.data.shape[0]}), the same batch_sizes and sorted_indices; got data "
                f"of shape {list(resets.data.shape)}")
        flags, _ = pad_packed_sequence(PackedSequence(resets.data, resets.batch_sizes))
        return _check_resets(flags, x.size(0), x.size(1), False, x.device)


class LSTM(_RNNBase):
    """Drop-in for :class:`torch.nn.LSTM` (same arguments, including ``proj_size``).

    ``forward(input, hx=None, *, lengths=None)``: ``lengths`` is an optional
    integer tensor [B] (any device, any order) for padded input; outputs past
    each length are zero and ``h_n``/``c_n`` are taken at each sequence's end.
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # torch.nn.LSTM's own helpers for (h, c) state, reused as-is.
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden


class GRU(_RNNBase):
    """Drop-in for :class:`torch.nn.GRU`; ``forward`` also takes ``lengths=`` (see LSTM)."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class RNN(_RNNBase):
    """Drop-in for :class:`torch.nn.RNN`; ``forward`` also takes ``lengths=`` (see LSTM)."""

    def __init__(self, *args, **kwargs):
        # Same argument handling as torch.nn.RNN: nonlinearity is the 4th positional.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(mode, *args, **kwargs)


class _LayerNormRNNBase(_RNNBase):
    """LayerNorm LSTM/GRU: ``_RNNBase``'s forward (input forms, checks, regularisers) over
    this class's parameters, each layer run by ``functional.ln_layer``. Subclasses set
    ``_mode`` (torch's mode name, which picks the state and the error messages) and
    ``_weight_slots`` (``ln_layer``'s weight tuple, also the parameters' order)."""

    _mode = ""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *, eps=1e-5,
                 zoneout=0.0, recurrent_dropout=0.0, weight_dropout=0.0, **kwargs):
        name = type(self).__name__
        if "proj_size" in kwargs:
            raise ValueError(f"proj_size argument is only supported for LSTM, not {name}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
            raise ValueError(f"{name}: eps must be a positive finite number, got {eps!r}")
        # torch's RNNBase checks the arguments and sets the attributes; the parameters it
        # makes are torch.nn's set, replaced below.
        super().__init__(self._mode, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout, weight_dropout=weight_dropout,
                         **kwargs)
        self.eps = float(eps)
        self._parameters.clear()
        # RNNBase's bookkeeping (all_weights, _flat_weights) follows these names.
        self._all_weights = []
        for layer, directions in enumerate(self._weight_names()):
            for names in directions:
                group = []
                for slot, n in zip(self._weight_slots, names):
                    if slot is None or (slot.startswith("bias") and not bias):
                        continue
                    shape = self._shape(slot, layer)
                    self.register_parameter(n, torch.nn.Parameter(
                        torch.empty(shape, device=device, dtype=dtype)))
                    group.append(n)
                self._all_weights.append(group)
        self._flat_weights_names = [n for group in self._all_weights for n in group]
        self._init_flat_weights()
        self.reset_parameters()

    def _shape(self, slot, layer):
        H, D = self.hidden_size, 2 if self.bidirectional else 1
        GH = {"LSTM": 4, "GRU": 3}[self.mode] * H
        if slot == "weight_ih":
            return (GH, self.input_size if layer == 0 else H * D)
        if slot == "weight_hh":
            return (GH, H)
        return (H,) if slot.startswith("ln_c_") else (GH,)

    def reset_parameters(self):
        """LayerNorm weights 1 and biases 0; the rest U(-1/sqrt(H), 1/sqrt(H)) as torch.nn."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if not name.startswith("ln_"):
                init.uniform_(p, -stdv, stdv)
            elif "_weight_" in name:
                init.ones_(p)
            else:
                init.zeros_(p)

    def extra_repr(self):
        s = super().extra_repr()
        return s + (f", eps={self.eps}" if self.eps != 1e-5 else "")

    def _layer_op(self):
        return functools.partial(F.ln_layer, eps=self.eps)


class LayerNormLSTM(_LayerNormRNNBase):
    """LSTM with layer normalisation (Ba et al. 2016), gates i, f, g, o::

        gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) + bias
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(LN_c(c'))

    Each LN normalises the whole vector of one row (4H values, H for LN_c). Arguments as
    :class:`fastrnn.LSTM` without ``proj_size``, plus keyword-only ``eps`` (LN's epsilon).
    Parameters per layer k (``_reverse`` for the reverse direction): ``weight_ih_l{k}``
    [4H, I_k], ``weight_hh_l{k}`` [4H, H], ``bias_l{k}`` [4H] (one bias; none with
    ``bias=False``), ``ln_ih_weight_l{k}``, ``ln_ih_bias_l{k}``, ``ln_hh_weight_l{k}``,
    ``ln_hh_bias_l{k}`` [4H], ``ln_c_weight_l{k}``, ``ln_c_bias_l{k}`` [H].
    ``forward`` is :class:`fastrnn.LSTM`'s.
    """

    _mode = "LSTM"
    _weight_slots = ("weight_ih", "weight_hh", "bias", None, "ln_ih_weight", "ln_ih_bias",
                     "ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias")

    # The (h, c) state's helpers, as fastrnn.LSTM.
    get_expected_cell_size = LSTM.get_expected_cell_size
    check_forward_args = LSTM.check_forward_args
    permute_hidden = LSTM.permute_hidden


class LayerNormGRU(_LayerNormRNNBase):
    """GRU with layer normalisation, gates r, z, n::

        a = LN_ih(x W_ih^T) + b_ih,  b = LN_hh(h W_hh^T) + b_hh
        r = sigmoid(a_r + b_r),  z = sigmoid(a_z + b_z),  n = tanh(a_n + r * b_n)
        h' = (1 - z) * n + z * h

    Each LN normalises the whole vector of one row (3H values). Arguments as
    :class:`fastrnn.GRU`, plus keyword-only ``eps`` (LN's epsilon). Parameters per layer k
    (``_reverse`` for the reverse direction): ``weight_ih_l{k}`` [3H, I_k],
    ``weight_hh_l{k}`` [3H, H], ``bias_ih_l{k}``, ``bias_hh_l{k}`` [3H] (none with
    ``bias=False``), ``ln_ih_weight_l{k}``, ``ln_ih_bias_l{k}``, ``ln_hh_weight_l{k}``,
    ``ln_hh_bias_l{k}`` [3H]. ``forward`` is :class:`fastrnn.GRU`'s.
    """

    _mode = "GRU"
    _weight_slots = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "ln_ih_weight",
                     "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", None, None)


class _CellBase(RNNCellBase):
    """Shared forward for the cells: a one-step run of the fused op."""

    _name = ""  # class name used in torch's messages
    _num_states = 1  # 2 for LSTMCell (h, c)

    def _cell(self):
        return "lstm" if self._num_states == 2 else "gru"

    def forward(self, input, hx=None):
        # A cell is often called once per step in a Python loop, so this path is kept short:
        # torch's checks in its order and wording, then the one-step layer call.
        lstm = self._num_states == 2
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )
        is_batched = input.dim() == 2
        if hx is None:
            batch = input.size(0) if is_batched else 1
            state = (torch.zeros(batch, self.hidden_size, dtype=input.dtype,
                                 device=input.device),) * self._num_states
        else:
            state = tuple(hx) if lstm else (hx,)
            for idx, h in enumerate(state):
                if h.dim() not in (1, 2):
                    what = f"hx[{idx}]" if lstm else "hidden"
                    raise ValueError(
                        f"{self._name}: Expected {what} to be 1D or 2D, got {h.dim()}D instead"
                    )
            if not is_batched:
                state = tuple(h.unsqueeze(0) for h in state)
        if not is_batched:
            input = input.unsqueeze(0)

        # The checks torch makes in C++ (_VF.*_cell), in its order and wording.
        if lstm and len(state) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        for idx, h in enumerate(state):
            if input.size(0) != h.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size "
                    f"{h.size(0)}"
                )
            if h.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{idx} has inconsistent hidden_size: got {h.size(1)}, "
                    f"expected {self.hidden_size}"
                )
        params = self._parameters  # one dict read instead of a module __getattr__ each
        weights = (params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"])
        _check_devices(input, state, weights)
        _check_state_dtype((input,) + state, weights[0])

        c0 = state[1] if lstm else None
        if input.dtype in _FLOAT and ops.plain_eager():
            # The op's one-step form takes the tensors as they are: no view node either side.
            _, h, c = ops.autograd_forward(self._cell(), input, state[0], c0, *weights, None,
                                           None, False, True)
            lead = 0
        else:  # autocast, tracing, half precision: the layer's path, one step
            _, h, c = F.layer(self._cell(), input.unsqueeze(0), state[0].unsqueeze(0),
                              None if c0 is None else c0.unsqueeze(0), [weights + (None,)])
            lead = 1  # the direction axis
        # Views that drop the leading axes (and the batch axis of unbatched input): their
        # backward is a view too, where indexing would allocate and fill a zero gradient.
        lead += not is_batched
        out = (h, c) if lstm else (h,)
        if lead:
            out = tuple(t.view(t.shape[lead:]) for t in out)
        return out if lstm else out[0]


class LSTMCell(_CellBase):
    """Drop-in for :class:`torch.nn.LSTMCell`."""

    _name = "LSTMCell"
    _num_states = 2

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)


class GRUCell(_CellBase):
    """Drop-in for :class:`torch.nn.GRUCell`."""

    _name = "GRUCell"

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)


class RNNCell(_CellBase):
    """Drop-in for :class:`torch.nn.RNNCell`."""

    _name = "RNNCell"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh",
                 device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def _cell(self):
        # torch accepts any string at construction and fails at the first forward.
        if self.nonlinearity == "tanh":
            return "rnn_tanh"
        if self.nonlinearity == "relu":
            return "rnn_relu"
        raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
