"""fastrnn.convert / fastrnn.to_torch on whole models."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import fastrnn

F64 = {"atol": 1e-9, "rtol": 1e-7}
RECURRENT = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
FAST = (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN, fastrnn.LSTMCell, fastrnn.GRUCell,
        fastrnn.RNNCell)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.stack = nn.ModuleList(
            [nn.GRU(12, 5), nn.Sequential(nn.RNN(5, 3, nonlinearity="relu"))])

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.stack[0](y.transpose(0, 1))
        y, _ = self.stack[1](y)
        return y


class Model(nn.Module):
    """Nested containers, every recurrent type, and a cell loop."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.cells = nn.ModuleDict({
            "lstm": nn.LSTMCell(3, 4), "gru": nn.GRUCell(4, 4), "rnn": nn.RNNCell(4, 2)})
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        y = self.encoder(x)
        h = c = torch.zeros(y.size(1), 4, dtype=y.dtype)
        outs = []
        for t in range(y.size(0)):
            h, c = self.cells["lstm"](y[t], (h, c))
            g = self.cells["gru"](h)
            outs.append(self.cells["rnn"](g))
        return self.head(torch.stack(outs)).sum(0)


def recurrent_types(model):
    return [type(m) for m in model.modules() if isinstance(m, RECURRENT + FAST)]


def test_convert_nested_model_outputs_and_training():
    torch.manual_seed(0)
    original = Model().double()
    model = copy.deepcopy(original)
    params_before = list(model.parameters())
    assert fastrnn.convert(model) is model
    types = recurrent_types(model)
    assert len(types) == 6 and all(t in FAST for t in types)
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    assert list(model.state_dict()) == list(original.state_dict())

    x = torch.randn(3, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), **F64)

    # A few SGD steps on each keep them together.
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (original, model)]
    for step in range(3):
        x = torch.randn(3, 7, 4, dtype=torch.float64)
        target = torch.randn(3, 1, dtype=torch.float64)
        for m, opt in zip((original, model), opts):
            opt.zero_grad()
            ((m(x) - target) ** 2).mean().backward()
            opt.step()
        for (name, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
            torch.testing.assert_close(a, b, **F64, msg=f"step {step}: {name}")
    torch.testing.assert_close(model(x), original(x), **F64)


def test_to_torch_reverses_convert():
    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    expected = model(x)
    fastrnn.convert(model)
    assert fastrnn.to_torch(model) is model
    types = recurrent_types(model)
    assert len(types) == 6 and all(t in RECURRENT for t in types)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("ref_cls,fast_cls", zip(RECURRENT, FAST))
def test_convert_bare_module(ref_cls, fast_cls):
    torch.manual_seed(0)
    module = ref_cls(4, 5).double()
    x = torch.randn(2, 4, dtype=torch.float64)  # unbatched sequence, or a batch for cells
    expected = module(x)
    assert fastrnn.convert(module) is module
    assert type(module) is fast_cls
    torch.testing.assert_close(module(x), expected, **F64)
    assert type(fastrnn.to_torch(module)) is ref_cls
    assert type(fastrnn.convert(fastrnn.convert(module))) is fast_cls  # idempotent


def test_convert_keeps_tying_sharing_and_hooks():
    torch.manual_seed(0)
    shared = nn.GRU(3, 3)
    a, b = nn.LSTM(3, 3), nn.LSTM(3, 3)
    b.weight_hh_l0 = a.weight_hh_l0  # tied across modules
    model = nn.Sequential(a, nn.ModuleList([b, shared]), shared)
    calls = []
    a.register_forward_hook(lambda *args: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    fastrnn.convert(model)
    assert type(a) is fastrnn.LSTM and type(b) is fastrnn.LSTM  # same objects, converted
    assert model[1][1] is model[2] and type(shared) is fastrnn.GRU
    assert b.weight_hh_l0 is a.weight_hh_l0
    a(torch.randn(2, 1, 3))
    assert calls == [1]

    # The optimizer built before convert still drives the converted modules.
    before = a.weight_hh_l0.detach().clone()
    (a(torch.randn(2, 1, 3))[0].sum() + b(torch.randn(2, 1, 3))[0].sum()).backward()
    opt.step()
    assert not torch.equal(a.weight_hh_l0, before)
    assert b.weight_hh_l0 is a.weight_hh_l0


def test_convert_leaves_subclasses_alone():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    model = nn.Sequential(MyLSTM(3, 3))
    fastrnn.convert(model)
    assert type(model[0]) is MyLSTM


def test_converted_model_pickles_and_copies():
    torch.manual_seed(0)
    model = fastrnn.convert(Model().double())
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    expected = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(buf, weights_only=False)):
        assert recurrent_types(other) == recurrent_types(model)
        torch.testing.assert_close(other(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("attr", ["zoneout", "recurrent_dropout", "weight_dropout"])
def test_to_torch_refuses_fastrnn_only_regularisers(attr):
    # torch.nn would silently train without them: refuse, and convert nothing.
    model = torch.nn.Sequential(fastrnn.GRU(4, 5), fastrnn.LSTM(5, 6, **{attr: 0.25}))
    with pytest.raises(ValueError, match=f"LSTM \\(1\\) has {attr}=0.25"):
        fastrnn.to_torch(model)
    assert type(model[0]) is fastrnn.GRU and type(model[1]) is fastrnn.LSTM
    setattr(model[1], attr, 0.0)
    fastrnn.to_torch(model)
    assert type(model[0]) is torch.nn.GRU and type(model[1]) is torch.nn.LSTM
