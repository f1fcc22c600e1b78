"""LayerNormLSTM / LayerNormGRU: the reference against what users write today (the cells'
math in a per-step loop with nn.LayerNorm), the modules against the reference run layer by
layer with the modules' parameters, gradients, regularisers, parameters and errors."""
import copy
import math
import pickle
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import functional as F
from fastrnn import reference as R

from test_modules import LENGTHS_ERRORS, assert_same_error, forward_error_cases

KINDS = {"lstm": fastrnn.LayerNormLSTM, "gru": fastrnn.LayerNormGRU}
PLAIN = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}
GATES = {"lstm": 4, "gru": 3}
LN_NAMES = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_c_weight",
            "ln_c_bias")
F64 = dict(atol=1e-10, rtol=0)
# float32 is checked against the float64 reference on the same values, by the norm-wise
# relative error of each output and gradient: parameter gradients sum over every step and
# row, where the summation order alone moves single elements past any elementwise bound
# that fits them all. The float32 reference itself is at about 1e-6 on these tests.
F32_NORMWISE = 1e-5
T, B, I, H = 6, 4, 3, 5


def seeded(*key):
    torch.manual_seed(zlib.crc32(repr(key).encode()))


# ---- the reference against a per-step loop with nn.LayerNorm ----------------------------

def users_loop(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c):
    """What users write today: the cell's math step by step, nn.LayerNorm modules on the
    whole gate vector (ln_c on LSTM's c)."""
    ys = []
    for xt in x:
        gi = ln_ih(nn.functional.linear(xt, w_ih))
        gh = ln_hh(nn.functional.linear(h, w_hh))
        if cell == "lstm":
            i, f, g, o = (gi + gh + b_ih).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(ln_c(c))
        else:
            a_r, a_z, a_n = (gi + b_ih).chunk(3, 1)
            b_r, b_z, b_n = (gh + b_hh).chunk(3, 1)
            r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
            n = torch.tanh(a_n + r * b_n)
            h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys), h, c


def random_layer_norm(n, eps, g):
    ln = nn.LayerNorm(n, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
        ln.bias.copy_(0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    return ln


@pytest.mark.parametrize("size", [(5, 3, 4, 6), (9, 2, 7, 16)], ids=["small", "larger"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", KINDS)
def test_reference_matches_users_loop(cell, reverse, size):
    T, B, I, H = size
    g = torch.Generator().manual_seed(sum(size))
    G, eps = GATES[cell], 1e-3

    def n(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, h0, c0 = n(T, B, I), n(B, H), n(B, H)
    w_ih, w_hh, b_ih, b_hh = n(G * H, I) / H ** 0.5, n(G * H, H) / H ** 0.5, n(G * H), n(G * H)
    ln_ih, ln_hh = random_layer_norm(G * H, eps, g), random_layer_norm(G * H, eps, g)
    ln_c = random_layer_norm(H, eps, g)
    lns = (ln_ih.weight, ln_ih.bias, ln_hh.weight, ln_hh.bias)
    if cell == "lstm":
        y, h, c = R.ln_lstm(x, h0, c0, w_ih, w_hh, b_ih, *lns, ln_c.weight, ln_c.bias,
                            reverse=reverse, eps=eps)
    else:
        y, h = R.ln_gru(x, h0, w_ih, w_hh, b_ih, b_hh, *lns, reverse=reverse, eps=eps)
    xs = x.flip(0) if reverse else x
    y_ref, h_ref, c_ref = users_loop(cell, xs, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh,
                                     ln_c)
    torch.testing.assert_close(y, y_ref.flip(0) if reverse else y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=0)
    if cell == "lstm":
        torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=0)


# ---- the modules against the reference, layer by layer ----------------------------------

def cell_of(m):
    return "lstm" if isinstance(m, fastrnn.LayerNormLSTM) else "gru"


def layer_weights(m, layer, d):
    """ln_layer's weight tuple for one layer and direction, read from m by name."""
    def p(name):
        return getattr(m, f"{name}_l{layer}{'_reverse' if d else ''}", None)

    biases = (p("bias"), None) if cell_of(m) == "lstm" else (p("bias_ih"), p("bias_hh"))
    return (p("weight_ih"), p("weight_hh"), *biases, *(p(n) for n in LN_NAMES))


def reference_run(m, x, hx=None, lengths=None, resets=None):
    """m's forward by hand on time-major x [T, B, I]: reference.ln_layer on every layer
    with m's parameters. In training, m's random draws are reproduced from the default
    generator in m's order: the weight_hh masks of every layer and direction, then per
    layer the dropout of its input, zoneout's z_h and z_c, the recurrent dropout mask.
    In eval, zoneout's weights are p (the expected value) and nothing is drawn."""
    cell = cell_of(m)
    T, B = x.shape[:2]
    D, L, Hs = 2 if m.bidirectional else 1, m.num_layers, m.hidden_size
    if hx is None:
        state = tuple(x.new_zeros(D * L, B, Hs) for _ in range(2 if cell == "lstm" else 1))
    else:
        state = hx if cell == "lstm" else (hx,)
    weights = [[layer_weights(m, layer, d) for d in range(D)] for layer in range(L)]
    train = m.training
    if train and m.weight_dropout:
        weights = [[(w[0], nn.functional.dropout(w[1], m.weight_dropout), *w[2:]) for w in ws]
                   for ws in weights]
    finals = []
    for layer in range(L):
        if layer and train and m.dropout:
            x = nn.functional.dropout(x, m.dropout)
        zh = zc = rec = None
        p = m.zoneout
        if p:  # z_h, then z_c for LSTM
            z = [x.new_empty((D, T, B, Hs)).bernoulli_(p) if train else
                 x.new_full((D, T, B, Hs), p) for _ in range(2 if cell == "lstm" else 1)]
            zh, zc = z[0], z[-1] if cell == "lstm" else None
        if train and m.recurrent_dropout:
            q = m.recurrent_dropout
            rec = x.new_empty((D, B, Hs)).bernoulli_(1 - q).div_(1 - q)
        s = [t[D * layer:D * (layer + 1)] for t in state]
        x, h, c = R.ln_layer(cell, x, s[0], s[1] if cell == "lstm" else None, weights[layer],
                             lengths, eps=m.eps, resets=resets, zoneout_h=zh, zoneout_c=zc,
                             rec_mask=rec)
        finals.append((h, c) if cell == "lstm" else (h,))
    final = tuple(torch.cat(parts) for parts in zip(*finals))
    return x, final if cell == "lstm" else final[0]


def randomize(m):
    """Random values in every parameter (LayerNorm's weights around 1), not the init."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_") and "_weight_" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(m.hidden_size))
    return m


def make(cell, dtype=torch.float64, **kw):
    return randomize(KINDS[cell](I, H, dtype=dtype, **kw))


def flat(out):
    y, state = out
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    return [y, *(state if isinstance(state, tuple) else (state,))]


def float64_twin(m, *tensors):
    """m and tensors as the float64 reference takes them: themselves when float64, else
    float64 copies (new leaves) of the same values."""
    if m.weight_ih_l0.dtype == torch.float64:
        return m, list(tensors)
    return copy.deepcopy(m).double(), [t.detach().double().requires_grad_() for t in tensors]


def assert_matches(outs, inputs, refs, ref_inputs):
    """outs and the gradients of a random linear function of them w.r.t. inputs, against
    refs and theirs w.r.t. ref_inputs (the float64 reference): float64 elementwise at F64,
    float32 norm-wise within F32_NORMWISE."""
    assert [o.shape for o in outs] == [r.shape for r in refs]
    cot = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(outs, inputs, [c.to(o.dtype) for c, o in zip(cot, outs)],
                              allow_unused=True)
    want = torch.autograd.grad(refs, ref_inputs, cot, allow_unused=True)
    pairs = [(f"output {i}", o, r) for i, (o, r) in enumerate(zip(outs, refs))]
    pairs += [(f"grad of input {i}", torch.zeros_like(inputs[i]) if g is None else g,
               torch.zeros_like(ref_inputs[i]) if w is None else w)
              for i, (g, w) in enumerate(zip(got, want))]
    for what, a, b in pairs:
        if a.dtype == torch.float64:
            torch.testing.assert_close(a, b, **F64, msg=lambda msg: f"{what}: {msg}")
        else:
            err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
            assert err <= F32_NORMWISE, f"{what}: norm-wise relative error {err:.1e}"


# (num_layers, bidirectional, batch_first, bias, input form, hx given)
CASES = [
    (1, False, False, True, "padded", False),
    (2, True, False, True, "lengths", True),
    (2, False, True, False, "lengths", False),
    (1, True, True, True, "packed", True),
    (2, True, False, False, "packed", False),
    (2, True, True, True, "resets", True),
    (1, False, False, True, "unbatched", True),
    (1, True, True, False, "unbatched", False),
]


def run_case(cell, layers, bidir, batch_first, bias, form, hx_given, dtype=torch.float64):
    seeded(cell, layers, bidir, batch_first, bias, form, hx_given, dtype)
    m = make(cell, dtype, num_layers=layers, bidirectional=bidir, batch_first=batch_first,
             bias=bias, eps=1e-3 if layers == 2 else 1e-5)
    D = 2 if bidir else 1
    batch = 1 if form == "unbatched" else B
    x = torch.randn(T, batch, I, dtype=dtype, requires_grad=True)  # time-major leaf
    hx = None
    if hx_given:
        hx = tuple(torch.randn(layers * D, batch, H, dtype=dtype, requires_grad=True)
                   for _ in range(2 if cell == "lstm" else 1))
    # Unsorted, with a full length; padded input also takes an empty sequence.
    lengths = torch.tensor([T, 2, 5, 1] if form == "packed" else [3, T, 0, 5])
    resets = torch.rand(T, B) < 0.3 if form == "resets" else None
    ref_lengths = None if form in ("padded", "unbatched") else lengths

    xm = x.transpose(0, 1) if batch_first else x
    hm = None if hx is None else hx if cell == "lstm" else hx[0]
    if form == "padded":
        out = m(xm, hm)
    elif form in ("lengths", "resets"):
        r = None if resets is None else resets.t() if batch_first else resets
        out = m(xm, hm, lengths=lengths, resets=r)
    elif form == "packed":
        out = m(pack_padded_sequence(xm, lengths, batch_first=batch_first,
                                     enforce_sorted=False), hm)
    else:
        hm = None if hm is None else tuple(t[:, 0] for t in hm) if cell == "lstm" else hm[:, 0]
        out = m(x[:, 0], hm)  # [T, I] with or without batch_first

    m_ref, (x_ref, *hx_ref) = float64_twin(m, x, *(hx or ()))
    h_ref = None if hx is None else tuple(hx_ref) if cell == "lstm" else hx_ref[0]
    y_ref, state_ref = reference_run(m_ref, x_ref, h_ref, ref_lengths, resets)
    if form == "packed":
        assert torch.equal(out[0].sorted_indices, lengths.sort(descending=True).indices)
        y_ref = pack_padded_sequence(y_ref, lengths, enforce_sorted=False).data
    elif form == "unbatched":
        y_ref = y_ref[:, 0]
        state_ref = (tuple(t[:, 0] for t in state_ref) if cell == "lstm"
                     else state_ref[:, 0])
    elif batch_first:
        y_ref = y_ref.transpose(0, 1)
    assert_matches(flat(out), [x, *(hx or ()), *m.parameters()], flat((y_ref, state_ref)),
                   [x_ref, *hx_ref, *m_ref.parameters()])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-{}-{}-{}-{}-{}".format(
    c[0], "bi" if c[1] else "uni", "bf" if c[2] else "tf", "bias" if c[3] else "nobias",
    c[4], "hx" if c[5] else "nohx"))
@pytest.mark.parametrize("cell", KINDS)
def test_module_matches_reference_fp64(cell, case):
    run_case(cell, *case)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=["lengths", "packed",
                                                                      "resets"])
@pytest.mark.parametrize("cell", KINDS)
def test_module_matches_reference_fp32(cell, case):
    run_case(cell, *case, dtype=torch.float32)


@pytest.mark.parametrize("cell", KINDS)
def test_larger_layer_fp32(cell):
    """Sizes that split the work over threads in the fused kernels (H not a multiple of 16)."""
    seeded(cell, "larger")
    m = randomize(KINDS[cell](24, 130))
    x = torch.randn(12, 17, 24, requires_grad=True)
    lengths = torch.randint(0, 13, (17,))
    lengths[0] = 12
    out = m(x, lengths=lengths)
    m_ref, (x_ref,) = float64_twin(m, x)
    ref = reference_run(m_ref, x_ref, lengths=lengths)
    assert_matches(flat(out), [x, *m.parameters()], flat(ref), [x_ref, *m_ref.parameters()])


@pytest.mark.parametrize("cell", KINDS)
def test_empty_batch(cell):
    m = make(cell, bidirectional=True)
    y, state = m(torch.randn(T, 0, I, dtype=torch.float64))
    assert y.shape == (T, 0, 2 * H)
    assert all(s.shape == (2, 0, H) for s in flat((y, state))[1:])


# ---- gradients ------------------------------------------------------------------------------

def functional_inputs(cell, D, T, Bn, In, Hn, seed):
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]

    def n(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return t.requires_grad_()

    def ln(size):  # LayerNorm's weight (around 1) and bias
        return [n(size, scale=0.3, shift=1), n(size, scale=0.3)]

    x, h0 = n(T, Bn, In), n(D, Bn, Hn)
    c0 = n(D, Bn, Hn) if cell == "lstm" else None
    weights = [(n(G * Hn, In, scale=0.5), n(G * Hn, Hn, scale=0.5), n(G * Hn, scale=0.5),
                n(G * Hn, scale=0.5) if cell == "gru" else None, *ln(G * Hn), *ln(G * Hn),
                *(ln(Hn) if cell == "lstm" else (None, None)))
               for _ in range(D)]
    return x, h0, c0, weights


def flat_call(cell, x, h0, c0, weights, lengths, **kw):
    """(leaves, fn(*leaves)) for gradcheck through functional.ln_layer."""
    items = [x, h0, c0, *(w for ws in weights for w in ws)]

    def fn(*args):
        it = iter(args)
        x, h0, c0, *ws = [None if t is None else next(it) for t in items]
        per = len(weights[0])
        ws = [tuple(ws[i:i + per]) for i in range(0, len(ws), per)]
        y, h, c = F.ln_layer(cell, x, h0, c0, ws, lengths, **kw)
        return (y, h) if c is None else (y, h, c)
    return [t for t in items if t is not None], fn


@pytest.mark.parametrize("lengths", [None, [4, 0, 2]], ids=["nolen", "len"])
@pytest.mark.parametrize("D, reverse", [(1, False), (1, True), (2, False)],
                         ids=["fwd", "rev", "bi"])
@pytest.mark.parametrize("cell", KINDS)
def test_functional_gradcheck(cell, D, reverse, lengths):
    x, h0, c0, weights = functional_inputs(cell, D, 4, 3, 2, 3, seed=D)
    lens = None if lengths is None else torch.tensor(lengths)
    leaves, fn = flat_call(cell, x, h0, c0, weights, lens, reverse=reverse, eps=1e-3,
                           resets=torch.tensor([[0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]],
                                               dtype=torch.bool))
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("cell", KINDS)
def test_functional_gradgradcheck(cell):
    x, h0, c0, weights = functional_inputs(cell, 1, 3, 2, 2, 2, seed=7)
    leaves, fn = flat_call(cell, x, h0, c0, weights, torch.tensor([3, 2]))
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("cell", KINDS)
def test_module_gradcheck_bidirectional_two_layers(cell):
    seeded(cell, "gradcheck")
    m = KINDS[cell](2, 2, num_layers=2, bidirectional=True, dtype=torch.float64)
    randomize(m)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().requires_grad_() for p in m.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,),
                                          dict(lengths=torch.tensor([4, 1, 3])))[0]

    assert torch.autograd.gradcheck(fn, [x, *params])


# ---- regularisers ---------------------------------------------------------------------------

REGULARISERS = {
    "zoneout": dict(zoneout=0.3),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "weight_dropout": dict(weight_dropout=0.2),
    "all": dict(zoneout=0.3, recurrent_dropout=0.25, weight_dropout=0.2, dropout=0.2),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("reg", REGULARISERS)
@pytest.mark.parametrize("cell", KINDS)
def test_regularisers_match_reference(cell, reg, training):
    """Two bidirectional layers with lengths; the module's draws reproduced by
    reference_run under the same seed (zoneout in eval: the expected value)."""
    seeded(cell, reg)
    m = make(cell, num_layers=2, bidirectional=True, **REGULARISERS[reg]).train(training)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, T, 0, 5])
    torch.manual_seed(5)
    out = m(x, lengths=lengths)
    torch.manual_seed(5)
    ref = reference_run(m, x, lengths=lengths)
    inputs = [x, *m.parameters()]
    assert_matches(flat(out), inputs, flat(ref), inputs)


@pytest.mark.parametrize("reg", REGULARISERS)
@pytest.mark.parametrize("cell", KINDS)
def test_training_draws_are_seeded_and_fresh(cell, reg):
    m = make(cell, num_layers=2, **REGULARISERS[reg])
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.manual_seed(1)
    y1 = m(x)[0]
    torch.manual_seed(1)
    assert torch.equal(m(x)[0], y1)
    assert not torch.equal(m(x)[0], y1)
    # eval: deterministic; only zoneout acts (as its expected value).
    m.eval()
    plain = KINDS[cell](I, H, num_layers=2, dtype=torch.float64).eval()
    plain.load_state_dict(m.state_dict())
    y_eval = m(x)[0]
    assert torch.equal(m(x)[0], y_eval)
    assert torch.equal(y_eval, plain(x)[0]) == ("zoneout" not in REGULARISERS[reg])


def test_no_regulariser_draws_nothing():
    m = make("lstm", num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.manual_seed(9)
    m(x)
    after = torch.rand(1)
    torch.manual_seed(9)
    assert torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("cell", KINDS)
def test_regularised_gradgradcheck(cell):
    """Double backward through the module with every regulariser (masks fixed by seed)."""
    m = KINDS[cell](2, 2, bidirectional=True, dtype=torch.float64, zoneout=0.3,
                    recurrent_dropout=0.3, weight_dropout=0.3)
    randomize(m)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().requires_grad_() for p in m.parameters()]

    def fn(x, *ps):
        torch.manual_seed(2)
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,),
                                          dict(lengths=torch.tensor([3, 2])))[0]

    assert torch.autograd.gradcheck(fn, [x, *params])
    assert torch.autograd.gradgradcheck(fn, [x, *params])


# ---- parameters, state and module behaviour -------------------------------------------------

def expected_parameters(cell, layers, bidir, bias, In=I, Hn=H):
    G, D = GATES[cell], 2 if bidir else 1
    out = []
    for layer in range(layers):
        for d in range(D):
            sfx = f"_l{layer}{'_reverse' if d else ''}"
            i_k = In if layer == 0 else Hn * D
            out += [("weight_ih" + sfx, (G * Hn, i_k)), ("weight_hh" + sfx, (G * Hn, Hn))]
            if bias:
                out += ([("bias" + sfx, (G * Hn,))] if cell == "lstm" else
                        [("bias_ih" + sfx, (G * Hn,)), ("bias_hh" + sfx, (G * Hn,))])
            out += [(n + sfx, (G * Hn,)) for n in LN_NAMES[:4]]
            if cell == "lstm":
                out += [(n + sfx, (Hn,)) for n in LN_NAMES[4:]]
    return out


@pytest.mark.parametrize("layers, bidir, bias", [(1, False, True), (2, True, True),
                                                 (3, True, False)])
@pytest.mark.parametrize("cell", KINDS)
def test_parameters_names_shapes_order_and_init(cell, layers, bidir, bias):
    m = KINDS[cell](I, H, num_layers=layers, bidirectional=bidir, bias=bias)
    want = expected_parameters(cell, layers, bidir, bias)
    assert [(n, tuple(t.shape)) for n, t in m.state_dict().items()] == want
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in want]
    assert sum(p.numel() for p in m.parameters()) == sum(math.prod(s) for _, s in want)
    # all_weights groups them per layer and direction, as torch.nn's.
    assert [p for ws in m.all_weights for p in ws] == list(m.parameters())
    assert len(m.all_weights) == layers * (2 if bidir else 1)
    bound = 1 / math.sqrt(H)
    for name, p in m.named_parameters():
        if name.startswith("ln_"):
            assert torch.equal(p, torch.ones_like(p) if "_weight_" in name else
                               torch.zeros_like(p)), name
        else:
            assert p.abs().max() <= bound and p.std() > bound / 4, name
    fresh = KINDS[cell](I, H, num_layers=layers, bidirectional=bidir, bias=bias)
    randomize(m)
    torch.manual_seed(4)
    m.reset_parameters()
    torch.manual_seed(4)
    fresh.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), fresh.parameters()))


@pytest.mark.parametrize("cell", KINDS)
def test_copy_pickle_dtype_state_dict_and_functional_call(cell):
    m = make(cell, num_layers=2, bidirectional=True, zoneout=0.1).eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    expected = flat(m(x))
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(other) is type(m) and other.zoneout == 0.1
        assert all(torch.equal(a, b) for a, b in zip(flat(other(x)), expected))
    loaded = KINDS[cell](I, H, num_layers=2, bidirectional=True, zoneout=0.1,
                         dtype=torch.float64).eval()
    loaded.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(flat(loaded(x)), expected))
    params = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    out = torch.func.functional_call(m, params, (x,))
    loaded.load_state_dict(params)
    assert all(torch.equal(a, b) for a, b in zip(flat(out), flat(loaded(x))))
    m.float()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m(x.float())[0].dtype == torch.float32


def test_repr():
    assert repr(fastrnn.LayerNormLSTM(3, 4)) == "LayerNormLSTM(3, 4)"
    assert repr(fastrnn.LayerNormGRU(3, 4, num_layers=2, bidirectional=True, eps=1e-3,
                                     zoneout=0.1)) == \
        "LayerNormGRU(3, 4, num_layers=2, bidirectional=True, zoneout=0.1, eps=0.001)"


def test_convert_and_to_torch_leave_them_alone():
    model = nn.Sequential(fastrnn.LayerNormLSTM(3, 4), nn.LSTM(4, 4),
                          fastrnn.LayerNormGRU(4, 4, zoneout=0.2))
    fastrnn.convert(model)
    assert [type(m) for m in model] == [fastrnn.LayerNormLSTM, fastrnn.LSTM,
                                        fastrnn.LayerNormGRU]
    fastrnn.to_torch(model)
    assert [type(m) for m in model] == [fastrnn.LayerNormLSTM, nn.LSTM, fastrnn.LayerNormGRU]


def test_exported():
    assert {"LayerNormLSTM", "LayerNormGRU"} <= set(fastrnn.__all__)
    assert not isinstance(fastrnn.LayerNormLSTM(3, 4), (fastrnn.LSTM, nn.LSTM))


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("cell", KINDS)
def test_proj_size_rejected(cell, proj_size):
    name = KINDS[cell].__name__
    with pytest.raises(ValueError, match=f"proj_size argument is only supported for LSTM, "
                                         f"not {name}"):
        KINDS[cell](I, H, proj_size=proj_size)


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf"), "1e-5", None, True])
@pytest.mark.parametrize("cell", KINDS)
def test_bad_eps(cell, eps):
    with pytest.raises(ValueError, match=f"{KINDS[cell].__name__}: eps must be a positive "
                                         f"finite number, got {eps!r}"):
        KINDS[cell](I, H, eps=eps)


CTOR_ERRORS = [
    {"hidden_size": 0}, {"input_size": -1}, {"num_layers": 0}, {"dropout": 1.5},
    {"dropout": "0.1"}, {"bias": 1}, {"batch_first": None}, {"hidden_size": 2.0},
    {"zoneout": 1.0}, {"recurrent_dropout": -0.1}, {"weight_dropout": None},
]


@pytest.mark.parametrize("kwargs", CTOR_ERRORS, ids=lambda kw: "-".join(map(str, kw.items())))
@pytest.mark.parametrize("cell", KINDS)
def test_constructor_errors_as_plain(cell, kwargs):
    kwargs = {"input_size": I, "hidden_size": H, **kwargs}
    assert_same_error(lambda: PLAIN[cell](**kwargs), lambda: KINDS[cell](**kwargs))


def plain_forward_errors():
    for kind, what, kwargs, make_args in forward_error_cases():
        if kind in KINDS and "proj_size" not in kwargs:
            yield pytest.param(kind, kwargs, make_args, id=f"{kind}-{what}")


@pytest.mark.parametrize("cell, kwargs, make_args", plain_forward_errors())
def test_forward_errors_as_plain(cell, kwargs, make_args):
    """The same exception and message as fastrnn.LSTM/GRU (torch.nn's, where it has one);
    sizes from test_modules."""
    from test_modules import H as Hm, I as Im
    plain = PLAIN[cell](Im, Hm, dtype=torch.float64, **kwargs)
    ln = KINDS[cell](Im, Hm, dtype=torch.float64, **kwargs)
    x, hx = make_args(cell)
    assert_same_error(lambda: plain(x, hx), lambda: ln(x, hx))


@pytest.mark.parametrize("lengths, exc, msg", LENGTHS_ERRORS)
def test_lengths_errors(lengths, exc, msg):
    from test_modules import T as Tm, B as Bm, I as Im, H as Hm
    x = torch.randn(Tm, Bm, Im)
    for cell in KINDS:
        with pytest.raises(exc, match=msg):
            KINDS[cell](Im, Hm)(x, lengths=lengths)


# ---- CUDA ---------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available() or not fastrnn.ops._C.cuda,
                    reason="needs a CUDA device and fastrnn's CUDA kernels")
@pytest.mark.parametrize("cell", KINDS)
def test_cuda_matches_cpu(cell):
    """The modules on the GPU; tests/test_cuda.py (test_ln_*) has the thorough checks."""
    m = make(cell, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([3, T, 0, 5])
    expected = flat(m(x, lengths=lengths))
    gpu = copy.deepcopy(m).cuda()
    out = flat(gpu(x.cuda(), lengths=lengths))
    for o, e in zip(out, expected):
        torch.testing.assert_close(o.cpu(), e, atol=1e-9, rtol=1e-7)
