"""fastrnn: fused LSTM/GRU/RNN kernels for PyTorch, as drop-in torch.nn modules, and
LayerNorm LSTM/GRU layers."""
from . import functional, reference
from .modules import GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormLSTM, LSTMCell, RNNCell
from .convert import convert, to_torch
from .onnx import _register_when_onnxscript_loads

# torch.onnx.export then turns fastrnn layers into ONNX LSTM/GRU/RNN nodes (see onnx.py).
_register_when_onnxscript_loads()

__all__ = [
    "functional", "reference",
    "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU",
    "convert", "to_torch",
]
