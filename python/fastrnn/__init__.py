"""fastrnn: fused LSTM/GRU/RNN kernels for PyTorch, as drop-in torch.nn modules."""
from . import functional, reference
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .convert import convert, to_torch

__all__ = [
    "functional", "reference",
    "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell",
    "convert", "to_torch",
]
