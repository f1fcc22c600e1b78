"""ONNX export: each fused fastrnn layer becomes one standard ONNX LSTM, GRU or RNN node.

``torch.onnx.export(model, args, dynamo=True)`` builds its table of translations, at
every export, from onnxscript's torch_lib registry (where torchvision's ops are
registered too). fastrnn adds ``fastrnn::forward`` there, so the plain exporter works
with no ``custom_translation_table``. onnxscript takes about half a second to import,
so ``import fastrnn`` does not import it: the translation is registered the moment
onnxscript is imported (the exporter imports it on its first use), or at once if it
already is.

How a ``fastrnn::forward`` call maps to the ONNX node (opset 14+ semantics):

- gate order: LSTM i,f,g,o -> ONNX i,o,f,c; GRU r,z,n -> ONNX z,r,h; RNN has one gate.
- GRU: ``linear_before_reset=1``, torch's form (the reset gate multiplies W_hn h + b_hn).
- ``B`` is the input and recurrent biases side by side; none when the layer has no bias.
- ``lengths`` becomes ``sequence_lens`` (int32): ONNX then leaves outputs past each
  length zero and returns each sequence's state at its own last step, as fastrnn does
  (a length-0 sequence's state is picked from the initial state by a Where node).
- ``layout`` stays 0 (time-major). The op is always time-major; with batch_first the
  graph transposes around it, and those Transposes export as ONNX Transpose nodes.
  onnxruntime's CPU LSTM/GRU/RNN kernels reject ``layout=1`` ("Batchwise recurrent
  operations (layout == 1) are not supported"), so a layout-1 node would not run there.
- LSTM ``proj_size`` has no ONNX equivalent: export raises an error naming it. So have
  ``resets=``, ``zoneout`` (which still acts in eval) and ``recurrent_dropout``, and
  ``LayerNormLSTM`` / ``LayerNormGRU`` (``fastrnn::ln_forward``): standard ONNX's LSTM and
  GRU have no normalisation inside the recurrence.
"""
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["register"]

# For each ONNX gate, in ONNX order, the index of torch's gate chunk.
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}
_NODE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
_OP_NAME = "fastrnn::forward"
_LN_OP_NAME = "fastrnn::ln_forward"
_MM_OP_NAME = "fastrnn::mm"


def _forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save,
             resets=None, zoneout_h=None, zoneout_c=None, rec_mask=None, bf16_gemms=False):
    """ONNX translation of ``fastrnn::forward`` (traced by onnxscript, so plain Python
    runs here and only the ``op.*`` calls become nodes)."""
    from onnxscript.onnx_opset import opset18 as op

    if w_hr is not None:
        raise NotImplementedError(
            "fastrnn: ONNX export of an LSTM with proj_size > 0 is not supported: the "
            "standard ONNX LSTM operator has no output projection (proj_size)")
    for name, t in (("resets=", resets), ("zoneout", zoneout_h),
                    ("recurrent_dropout", rec_mask)):
        if t is not None:
            raise NotImplementedError(
                f"fastrnn: ONNX export with {name} is not supported: the standard ONNX "
                f"LSTM/GRU/RNN operators have no equivalent")
    D, GH, _ = w_hh.shape  # static: weights have fixed shapes
    order = _GATE_ORDER[cell]
    H = GH // len(order)

    def gates_onnx_order(w):  # [D, G*H, ...]: torch's gate chunks in ONNX's order
        if len(order) == 1:
            return w
        return op.Concat(*[op.Slice(w, [g * H], [(g + 1) * H], [1]) for g in order], axis=1)

    # Direction d of the op runs reversed when reverse != (d == 1). ONNX's bidirectional
    # node runs direction 0 forward, so reverse=True with two directions swaps them.
    swap = D == 2 and reverse

    def swap_dirs(v, axis=0):
        if not swap or v is None:
            return v
        first, second = (op.Slice(v, [d], [d + 1], [axis]) for d in (0, 1))
        return op.Concat(second, first, axis=axis)

    W = swap_dirs(gates_onnx_order(w_ih))
    R = swap_dirs(gates_onnx_order(w_hh))
    B = None
    if b_ih is not None or b_hh is not None:  # a missing one of the two is zeros
        present = b_hh if b_ih is None else b_ih
        zeros = op.CastLike(op.ConstantOfShape(op.Shape(present)), present)
        B = swap_dirs(op.Concat(gates_onnx_order(zeros if b_ih is None else b_ih),
                                gates_onnx_order(zeros if b_hh is None else b_hh), axis=1))
    seq_lens = None if lengths is None else op.Cast(lengths, to=6)  # 6: INT32

    attrs = {"hidden_size": H,
             "direction": "bidirectional" if D == 2 else "reverse" if reverse else "forward"}
    if cell == "gru":
        attrs["linear_before_reset"] = 1
    elif cell != "lstm":
        attrs["activations"] = ["Tanh" if cell == "rnn_tanh" else "Relu"] * D

    inputs = [x, W, R, B, seq_lens, swap_dirs(h0)]
    if cell == "lstm":
        y, h_n, c_n = getattr(op, _NODE[cell])(*inputs, swap_dirs(c0), **attrs)
        c_n = swap_dirs(c_n)
    else:
        y, h_n = getattr(op, _NODE[cell])(*inputs, **attrs)
        c_n = None

    # ONNX Y is [T, D, B, H]; the op's y is [T, B, D*H].
    y = op.Reshape(op.Transpose(swap_dirs(y, axis=1), perm=[0, 2, 1, 3]), [0, 0, -1])
    h_n = swap_dirs(h_n)
    if seq_lens is not None:
        # A sequence of length 0 keeps its initial state in fastrnn (and torch's
        # lengths semantics); onnxruntime returns zeros there, so pick the initial state.
        zero = op.CastLike(op.Constant(value_int=0), lengths)
        is_empty = op.Unsqueeze(op.Equal(lengths, zero), [0, 2])  # [1, B, 1]
        h_n = op.Where(is_empty, h0, h_n)
        c_n = None if c_n is None else op.Where(is_empty, c0, c_n)

    # The rest of the op's outputs (c_n of a GRU/RNN, the tensors saved for backward)
    # have no ONNX counterpart and nothing in an exported graph reads them: empty.
    def unused():
        return op.CastLike(op.ConstantOfShape([0]), x)

    return (y, h_n, unused() if c_n is None else c_n, unused(), unused(), unused(), unused())


def _mm(a, b):
    """``fastrnn::mm`` (a @ b with fastrnn's CPU GEMM) is ONNX's MatMul."""
    from onnxscript.onnx_opset import opset18 as op

    return op.MatMul(a, b)


def _ln_forward(cell, *args, **kwargs):
    """``fastrnn::ln_forward`` has no ONNX translation: say so by name."""
    raise NotImplementedError(
        "fastrnn: ONNX export of LayerNormLSTM/LayerNormGRU is not supported: the standard "
        "ONNX LSTM/GRU operators have no layer normalisation inside the recurrence; "
        "torch.export and AOTInductor do support them (see README, Deploying)")


def register():
    """Add fastrnn's ONNX translation to onnxscript's torch_lib registry (idempotent).

    Called for you; needs onnxscript. Afterwards ``torch.onnx.export(..., dynamo=True)``
    turns fastrnn layers into ONNX LSTM/GRU/RNN nodes.
    """
    from onnxscript.function_libs.torch_lib import registration

    if _OP_NAME not in registration.default_registry:
        registration.torch_op(_OP_NAME, trace_only=True)(_forward)
    for name, fn in ((_LN_OP_NAME, _ln_forward), (_MM_OP_NAME, _mm)):
        if name not in registration.default_registry:
            registration.torch_op(name, trace_only=True)(fn)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Calls :func:`register` right after the package ``onnxscript`` is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "onnxscript":
            return None
        sys.meta_path.remove(self)  # once; also keeps find_spec below from coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register()
            except Exception as e:  # never break the user's import of onnxscript
                warnings.warn(f"fastrnn: ONNX translation not registered: {e!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def _register_when_onnxscript_loads():
    if "onnxscript" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
