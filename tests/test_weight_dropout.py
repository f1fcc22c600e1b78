"""weight_dropout= (DropConnect on weight_hh): masks, reproducibility, gradients, eval and
argument errors."""
import pytest
import torch

import fastrnn

KINDS = ["LSTM", "GRU", "RNN"]


def make(kind, **kw):
    torch.manual_seed(0)
    return getattr(fastrnn, kind)(3, 5, dtype=torch.float64, **kw)


def masked_copy(fast, p):
    """torch.nn module with fast's weights, W_hh of every layer and direction under the masks
    fast draws (same generator, same order: layer by layer, forward then reverse)."""
    state = {}
    for layer in range(fast.num_layers):
        for sfx in ("", "_reverse")[:2 if fast.bidirectional else 1]:
            w = getattr(fast, f"weight_hh_l{layer}{sfx}")
            state[f"weight_hh_l{layer}{sfx}"] = torch.nn.functional.dropout(w, p, training=True)
    for name, t in fast.state_dict().items():
        state.setdefault(name, t)
    ref = getattr(torch.nn, type(fast).__name__)(  # after the masks: its init draws too
        fast.input_size, fast.hidden_size, num_layers=fast.num_layers,
        bidirectional=fast.bidirectional, batch_first=fast.batch_first, dtype=torch.float64)
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_uses_masked_weights(kind, bidirectional):
    p = 0.4
    fast = make(kind, num_layers=2, bidirectional=bidirectional, weight_dropout=p)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 0])
    before = {n: t.clone() for n, t in fast.named_parameters()}
    torch.manual_seed(11)
    y, _ = fast(x, lengths=lengths)
    torch.manual_seed(11)
    ref = masked_copy(fast, p)
    y_ref, _ = fastrnn.convert(ref)(x, lengths=lengths)  # the same weights, no dropout
    assert torch.equal(y, y_ref)
    for n, t in fast.named_parameters():  # the parameters themselves are untouched
        assert torch.equal(t, before[n])
    # A fresh mask every call; the same seed, the same bits.
    torch.manual_seed(11)
    assert torch.equal(fast(x, lengths=lengths)[0], y)
    assert not torch.equal(fast(x, lengths=lengths)[0], y)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_is_plain(kind):
    fast = make(kind, weight_dropout=0.5).eval()
    plain = make(kind).eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert torch.equal(fast(x)[0], plain(x)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_gradients(kind):
    """The gradient reaches weight_hh through the mask: gradcheck with the mask held fixed
    by reseeding before every call."""
    fast = make(kind, bidirectional=True, weight_dropout=0.3)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in fast.named_parameters()]
    params = [t.detach().requires_grad_() for t in fast.parameters()]

    def fn(x, *ps):
        torch.manual_seed(5)
        return torch.func.functional_call(fast, dict(zip(names, ps)), (x,))[0]

    assert torch.autograd.gradcheck(fn, [x, *params])
    assert torch.autograd.gradgradcheck(fn, [x, *params])


def test_repr_and_default():
    assert "weight_dropout=0.25" in repr(make("GRU", weight_dropout=0.25))
    assert "weight_dropout" not in repr(make("GRU"))
    assert make("LSTM").weight_dropout == 0.0


@pytest.mark.parametrize("bad, match", [
    (1.0, r"weight_dropout probability has to be in \[0, 1\), but got 1.0"),
    (-0.1, r"weight_dropout probability has to be in \[0, 1\), but got -0.1"),
    ("0.5", "weight_dropout should be a number in range"),
    (True, "weight_dropout should be a number in range"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_probability(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        make(kind, weight_dropout=bad)
