"""Swap torch.nn recurrent modules for fastrnn ones inside a model, and back."""
import torch

from . import modules

__all__ = ["convert", "to_torch"]

_TO_FAST = {
    torch.nn.LSTM: modules.LSTM,
    torch.nn.GRU: modules.GRU,
    torch.nn.RNN: modules.RNN,
    torch.nn.LSTMCell: modules.LSTMCell,
    torch.nn.GRUCell: modules.GRUCell,
    torch.nn.RNNCell: modules.RNNCell,
}
_TO_TORCH = {fast: ref for ref, fast in _TO_FAST.items()}


def _swap(model, mapping):
    # The fastrnn classes add no state of their own: both sides build the same
    # __dict__ (torch's RNNBase / RNNCellBase __init__), so changing the class
    # in place is an exact conversion. Keeping the object keeps everything that
    # refers to it valid: the same Parameter objects (weight tying, optimizers),
    # hooks, shared submodules, and references held elsewhere in the model.
    # Only exact types are swapped: a user's subclass may override forward.
    for module in model.modules():
        new_class = mapping.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
    return model


def convert(model):
    """Replace, in place, every torch.nn LSTM/GRU/RNN and cell in ``model``
    (``model`` itself included) with its fastrnn equivalent; returns ``model``.

    Parameters, buffers, hooks and training mode are kept as they are, so
    outputs match and weight tying survives.
    """
    return _swap(model, _TO_FAST)


_ONLY_FASTRNN = ("zoneout", "recurrent_dropout", "weight_dropout")


def to_torch(model):
    """Reverse of :func:`convert`: fastrnn modules become torch.nn ones in place.

    ``LayerNormLSTM`` / ``LayerNormGRU`` have no torch.nn counterpart and stay as they are.
    Raises ValueError, converting nothing, if a module uses a regulariser that torch.nn
    does not have (``zoneout``, ``recurrent_dropout``, ``weight_dropout`` not 0): the
    torch.nn module would silently train without it.
    """
    for name, module in model.named_modules():
        if type(module) not in _TO_TORCH:
            continue
        for attr in _ONLY_FASTRNN:
            p = module.__dict__.get(attr, 0.0)
            if p:
                where = f" ({name})" if name else ""
                raise ValueError(
                    f"fastrnn.to_torch: {type(module).__name__}{where} has {attr}={p}, which "
                    f"torch.nn.{_TO_TORCH[type(module)].__name__} does not have; set it to 0 "
                    f"first to convert")
    return _swap(model, _TO_TORCH)
