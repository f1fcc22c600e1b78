"""bfloat16 and float16 models on the CPU (module.to(dtype), no autocast): they run on the
float32 kernels, so a layer gives exactly the float32 layer's result rounded to its dtype,
forward and backward (each layer's output is rounded, as it is a tensor of that dtype),
except that a bfloat16 model's large GEMMs (and a small batch's recurrent product) take
bfloat16 operands on a CPU with bf16 dot products; either way a model's error against
float64 is within 2x torch.nn's own."""
import pytest
import torch

import fastrnn

HALF = [torch.bfloat16, torch.float16]

MODULES = {
    "lstm": lambda: fastrnn.LSTM(5, 12, bidirectional=True),
    "lstm_proj": lambda: fastrnn.LSTM(5, 12, proj_size=4),
    "gru": lambda: fastrnn.GRU(5, 12),
    "rnn_relu": lambda: fastrnn.RNN(5, 12, nonlinearity="relu"),
    "ln_lstm": lambda: fastrnn.LayerNormLSTM(5, 12, bidirectional=True),
    "ln_gru": lambda: fastrnn.LayerNormGRU(5, 12),
}


def outputs_and_grads(model, x, lengths, dtype):
    """Outputs, input and parameter gradients, for cotangents representable in dtype (the
    gradient reaching a dtype output is of that dtype)."""
    out, state = model(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    g = torch.Generator().manual_seed(3)
    loss = sum((t.float() * torch.randn(t.shape, generator=g).to(dtype).float()).sum()
               for t in (out, *states))
    loss.backward()
    return [out, *states, x.grad] + [p.grad for p in model.parameters()]


BF16_DOT = bool({"avx512_bf16", "amx_bf16"} & set(fastrnn.cpu_capabilities()["features"]))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(MODULES))
def test_half_layer_is_the_float32_layer_rounded(name, dtype):
    """(Shapes below the bf16 GEMMs' and bf16 step's sizes, so on any CPU.)"""
    torch.manual_seed(0)
    half = MODULES[name]().to(dtype)
    full = MODULES[name]()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(6, 3, 5).to(dtype)
    lengths = torch.tensor([6, 2, 4])
    got = outputs_and_grads(half, x.clone().requires_grad_(), lengths, dtype)
    want = outputs_and_grads(full, x.float().requires_grad_(), lengths, dtype)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("batch", [4, 1])
@pytest.mark.parametrize("autocast", [False, True], ids=["model", "autocast"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_half_error_within_twice_torch(kind, dtype, autocast, batch):
    """Error against float64 of the outputs, final states and every gradient: at most 2x
    that of torch.nn's own in the same dtype (norm-wise), for a model in that dtype and
    for a float32 model under CPU autocast to it (fastrnn's large GEMMs then take bf16
    operands where the CPU has bf16 dot products, and at batch 1 the recurrent product
    too where it has AVX512_BF16)."""
    if autocast and dtype == torch.float16 and kind == "LSTM":
        pytest.skip("torch.nn.LSTM has no CPU float16 autocast (oneDNN lacks the primitive)")
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(16, 32, num_layers=2).double()
    x = torch.randn(20, batch, 16, dtype=torch.float64)

    def run(model, dtype):
        m = getattr(torch.nn if model == "torch" else fastrnn, kind)(16, 32, num_layers=2)
        m.load_state_dict(ref.state_dict())
        mixed = autocast and dtype != torch.float64
        m = m.to(torch.float32 if mixed else dtype)
        xi = x.to(torch.float32 if mixed else dtype).detach().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=mixed):
            out, state = m(xi)
        states = state if isinstance(state, tuple) else (state,)
        g = torch.Generator().manual_seed(3)
        loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum()
                   for t in (out, *states))
        loss.backward()
        return [t.double() for t in [out, *states, xi.grad] + [p.grad for p in m.parameters()]]

    exact = run("torch", torch.float64)
    ours, theirs = run("fastrnn", dtype), run("torch", dtype)
    for e, a, b in zip(exact, ours, theirs):
        err, torch_err = (a - e).norm() / e.norm(), (b - e).norm() / e.norm()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_cell_in_bfloat16():
    torch.manual_seed(0)
    cell = fastrnn.GRUCell(5, 7).to(torch.bfloat16)
    h = cell(torch.randn(3, 5, dtype=torch.bfloat16))
    assert h.dtype == torch.bfloat16 and h.shape == (3, 7)


def test_cpu_capabilities():
    caps = fastrnn.cpu_capabilities()
    assert caps["kernels"] in caps["supported_kernels"]
    assert set(caps["features"]) <= {"fma", "avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert caps["float16"] == "float32"
    assert caps["bfloat16"] == caps["autocast_bfloat16"] == (
        "bfloat16 GEMMs" if BF16_DOT else "float32")
    # Every batch size takes the bf16 step only where the narrow tiles' one can run.
    assert caps["bfloat16_recurrent_step"] or not caps["bfloat16_recurrent_step_all_batches"]
    assert "amx_bf16" in caps["features"] or not caps["bfloat16_recurrent_step_amx"]


def test_autocast_bf16_gemms_follow_the_cpu_features():
    """Under CPU bf16 autocast the large GEMMs take bfloat16 operands exactly when the CPU
    has bf16 dot products (AVX512_BF16 or AMX-BF16); otherwise the float32 path runs.
    (Large: 2^24 multiply-adds or more, as the input projection here.)"""
    torch.manual_seed(0)
    model = fastrnn.LSTM(128, 128)
    x = torch.randn(64, 4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)[0]
    full = model(x)[0].to(torch.bfloat16)
    assert torch.equal(y, full) != BF16_DOT
    # A bfloat16 model takes the same path as bf16 autocast.
    half = fastrnn.LSTM(128, 128).to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    xh = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = half(xh)[0]
    assert torch.equal(half(xh)[0], mixed)


def bf16(t):
    return t.to(torch.bfloat16).double()


def rounded_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, rec_mask, product):
    """One direction of fastrnn::forward with bf16_gemms=True, in float64 (differentiable):
    the input projection (from bfloat16 operands, its product rounded to bfloat16 as
    torch's autocast matmul, when it has 2^24 multiply-adds or more) plus b_ih; the
    recurrent product product(h fed to it) (h * rec_mask) plus b_hh. Returns y [T, B, P]."""
    if x.shape[0] * x.shape[1] * x.shape[2] * w_ih.shape[0] >= 1 << 24:
        gx = bf16(bf16(x) @ bf16(w_ih).t()) + b_ih.double()
    else:
        gx = x.double() @ w_ih.double().t() + b_ih.double()
    h, c, ys = h0.double(), None if c0 is None else c0.double(), []
    for t in range(x.shape[0]):
        hg = product(h * rec_mask.double() if rec_mask is not None else h) + b_hh.double()
        if cell == "lstm":
            i, f, g, o = (gx[t] + hg).chunk(4, 1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            if w_hr is not None:
                h = h @ w_hr.double().t()
        elif cell == "gru":
            (xr, xz, xn), (hr, hz, hn) = gx[t].chunk(3, 1), hg.chunk(3, 1)
            r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
            h = (1 - z) * (xn + r * hn).tanh() + z * h
        else:
            h = (gx[t] + hg).tanh()
        ys.append(h)
    return torch.stack(ys)


def rounded_reference(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, rec_mask, bf16_step):
    """rounded_layer with W_hh and the h fed to it rounded to bfloat16 when bf16_step, exact
    otherwise."""
    w = bf16(w_hh) if bf16_step else w_hh.double()
    return rounded_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, rec_mask,
                         lambda h: (bf16(h) if bf16_step else h) @ w.t())


BF16_STEP = "avx512_bf16" in fastrnn.cpu_capabilities()["features"]


def step_inputs(case, T):
    """Random float32 inputs of one direction for case (cell, B, H, proj, recdrop), T steps
    of 9 inputs: (generator for further draws, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
    rec_mask)); c0, w_hr, rec_mask None where the case has none."""
    cell, B, H, proj, recdrop = case
    I, P = 9, proj or H
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[cell]
    g = torch.Generator().manual_seed(B * 1000 + H)
    u = lambda *s: (torch.rand(*s, generator=g) * 2 - 1) / H ** 0.5  # noqa: E731
    x, h0 = torch.randn(T, B, I, generator=g), torch.randn(B, P, generator=g)
    c0 = torch.randn(B, H, generator=g) if cell == "lstm" else None
    w_ih, w_hh, b_ih, b_hh = u(G * H, I), u(G * H, P), u(G * H), u(G * H)
    w_hr = u(P, H) if proj else None
    mask = (torch.rand(B, P, generator=g) > 0.3).float() / 0.7 if recdrop else None
    return g, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask)


def takes_bf16_step(cell, B, H, P):
    """Whether the forward's recurrent product takes bfloat16 operands (recurrence.h's
    bf16_products), under bf16 autocast: a batch within the narrow tiles on a CPU with
    AVX512_BF16 for a float32 W_hh of 512 KiB or more; a larger batch on AMX tiles where
    they are allowed, for a W_hh of 64 KiB or more, or else as the narrow tiles where bf16
    products outpace FMAs."""
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[cell]
    narrow = B <= {"lstm": 3, "gru": 2, "rnn_tanh": 3}[cell]  # Isa::narrow_rows on AVX-512
    caps = fastrnn.cpu_capabilities()
    large = G * H * P * 4 >= 512 << 10
    if not narrow and caps["bfloat16_recurrent_step_amx"] and G * H * P * 4 >= 64 << 10:
        return True
    return bool((narrow or caps["bfloat16_recurrent_step_all_batches"]) and large and
                caps["bfloat16_recurrent_step"])


AMX = fastrnn.cpu_capabilities()["bfloat16_recurrent_step_amx"]


@pytest.fixture(params=["amx", "no-amx"] if AMX else ["no-amx"])
def amx(request):
    """Runs a test with the bf16 step's AMX tiles allowed (on a CPU and OS that have them)
    and without them (the bf16 step past the narrow tiles then follows the other rules)."""
    from fastrnn import _C

    before = _C.allow_amx(request.param == "amx")
    yield request.param == "amx"
    _C.allow_amx(before)


@pytest.mark.parametrize("case", [
    ("lstm", 1, 37, 0, False), ("lstm", 1, 300, 0, False), ("lstm", 2, 256, 129, False),
    ("gru", 1, 211, 0, True), ("gru", 1, 37, 0, True), ("rnn_tanh", 3, 400, 0, True),
    ("lstm", 8, 64, 0, False), ("rnn_tanh", 16, 300, 0, False), ("rnn_tanh", 1, 300, 0, False),
    ("lstm", 8, 256, 0, False), ("gru", 13, 211, 0, True), ("lstm", 5, 256, 129, True),
    ("gru", 37, 80, 0, False), ("lstm", 33, 100, 50, True), ("rnn_tanh", 17, 130, 0, False),
    ("rnn_tanh", 17, 16, 0, False),
], ids=lambda c: "%s-B%d-H%d-proj%d%s" % (c[0], c[1], c[2], c[3], "-recdrop" if c[4] else ""))
def test_bf16_recurrent_step(case, amx):
    """With bf16 GEMMs (CPU bf16 autocast), a batch small enough for the narrow tiles (any
    batch where bf16 products outpace float32 FMAs) and a W_hh of 512 KiB or more in
    float32, a CPU with AVX512_BF16 also runs the recurrent product from bfloat16 W_hh and h,
    and so does a larger batch on AMX tiles for a W_hh of 64 KiB or more (blocks of 16
    rows, K padded to 32):
    the result is the bfloat16-rounding reference, within float32 rounding. Elsewhere
    (larger batches without AMX, smaller W_hh, other CPUs and instruction sets) the
    recurrent product stays float32."""
    from fastrnn import ops

    cell, B, H, proj, _ = case
    _, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask) = step_inputs(case, 6)
    step = takes_bf16_step(cell, B, H, proj or H)
    assert fastrnn.cpu_capabilities()["bfloat16_recurrent_step"] == (
        BF16_STEP and ops._C.cpu_kernels() == "avx512" and ops._BF16_DOT)
    d = lambda t: None if t is None else t[None]  # noqa: E731
    with torch.no_grad():
        y = ops.forward(cell, x, h0[None], d(c0), w_ih[None], w_hh[None], b_ih[None],
                        b_hh[None], d(w_hr), None, False, False, None, None, None, d(mask),
                        ops._BF16_DOT)[0]
    if not ops._BF16_DOT:
        pytest.skip("no bf16 GEMMs on this CPU: the float32 layer runs (test_half_*)")
    want = rounded_reference(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, step)
    other = rounded_reference(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, not step)
    # Norm-wise: float32 sums differ from float64 ones, so now and then an h rounds to the
    # other neighbouring bfloat16 and the difference runs on through the later steps (seen:
    # RNN, B=17, H=130, 1.3e-4, where the other path is 2.5e-3 away); otherwise 1e-7-1e-5.
    err, apart = (((y.double() - r).norm() / r.norm()).item() for r in (want, other))
    assert err < 2e-4 and err < apart / 5, (err, apart)  # the other path is told apart


class _RecurrentProduct(torch.autograd.Function):
    """h @ w.t() in float64 with the bf16 step's roundings: forward from bfloat16 h and W_hh
    when fwd16, backward dh = dgates @ W_hh from bfloat16 dgates and W_hh when bwd16."""

    @staticmethod
    def forward(ctx, h, w, fwd16, bwd16):
        ctx.save_for_backward(w)
        ctx.bwd16 = bwd16
        return (bf16(h) @ bf16(w).t()) if fwd16 else h @ w.t()

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return ((bf16(grad) @ bf16(w)) if ctx.bwd16 else grad @ w), None, None, None


def rounded_state_gradients(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, gy, fwd16,
                            bwd16):
    """dx, dh0 (and dc0) of sum(y * gy) for rounded_layer in float64, the recurrent products
    rounded as _RecurrentProduct says (the input projection and dx exact: shapes below the
    bf16 GEMMs' size)."""
    inputs = [t.double().requires_grad_() for t in (x, h0) + (() if c0 is None else (c0,))]
    y = rounded_layer(cell, inputs[0], inputs[1], inputs[2] if c0 is not None else None, w_ih,
                      w_hh, b_ih, b_hh, w_hr, mask,
                      lambda h: _RecurrentProduct.apply(h, w_hh.double(), fwd16, bwd16))
    return torch.autograd.grad((y * gy.double()).sum(), inputs)


@pytest.mark.parametrize("case", [
    ("lstm", 1, 300, 0, False), ("lstm", 16, 256, 0, False), ("gru", 1, 211, 0, False),
    ("gru", 8, 256, 0, True), ("rnn_tanh", 2, 512, 0, False), ("rnn_tanh", 16, 400, 0, True),
    ("lstm", 5, 256, 129, True), ("lstm", 2, 300, 171, False), ("gru", 37, 80, 0, True),
    ("lstm", 20, 70, 60, False),
], ids=lambda c: "%s-B%d-H%d-proj%d%s" % (c[0], c[1], c[2], c[3], "-recdrop" if c[4] else ""))
def test_bf16_recurrent_backward(case, amx):
    """Where the forward's recurrent product takes bfloat16 operands (bfloat16_recurrent_step)
    and H is even, the backward's dgates W_hh does too (dgates and W_hh rounded to bfloat16,
    float32 sums): dx, dh0 and dc0 are those of the rounding reference, told apart from those of
    the float32 product. Elsewhere (odd H, other CPUs) it stays float32."""
    from fastrnn import ops

    cell, B, H, proj, _ = case
    T, P = 5, proj or H
    g, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask) = step_inputs(case, T)
    gy = torch.randn(T, B, P, generator=g)
    if not ops._BF16_DOT:
        pytest.skip("no bf16 GEMMs on this CPU: the float32 layer runs (test_half_*)")
    fwd16 = takes_bf16_step(cell, B, H, P)
    bwd16 = fwd16 and H % 2 == 0

    d = lambda t: None if t is None else t[None].requires_grad_()  # noqa: E731
    xs, hs, cs = x.clone().requires_grad_(), d(h0), d(c0)
    y = ops.run_forward(cell, xs, hs, cs, w_ih[None], w_hh[None], b_ih[None], b_hh[None],
                        None if w_hr is None else w_hr[None], None, False, True, None, None,
                        None, None if mask is None else mask[None], True)[0]
    got = torch.autograd.grad((y * gy).sum(), [xs, hs] + ([] if c0 is None else [cs]))
    args = (cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, mask, gy, fwd16)
    want = rounded_state_gradients(*args, bwd16)
    other = rounded_state_gradients(*args, not bwd16)

    def error(ref):  # norm-wise, the largest over dx, dh0, dc0
        return max(((a.double().reshape(b.shape) - b).norm() / b.norm()).item()
                   for a, b in zip(got, ref))

    # float32 sums differ from float64 ones, so a few gate gradients round to the other
    # neighbouring bfloat16 (each such flip moves dh0 by about 2^-8 / sqrt(G*H)): the
    # rounding reference is not met to float32 precision, but told apart from the other.
    err, apart = error(want), error(other)
    assert err < 5e-4 and err < apart / 5, (err, apart)


@pytest.mark.parametrize("varlen", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_input_projection(cell, varlen, amx):
    """An input projection of 2^24 multiply-adds or more takes bfloat16 operands, and the
    forward reads its bfloat16 product as it came, adding b_ih (ForwardParams::gx16); with
    lengths, over the valid rows only, placed back at their steps. The result is the
    rounding reference's (norm-wise, as above) for every row that runs all T steps."""
    from fastrnn import ops

    if not ops._BF16_DOT:
        pytest.skip("no bf16 GEMMs on this CPU: the float32 layer runs (test_half_*)")
    T, B, I, H = 16, 24, 256, 96
    G = {"lstm": 4, "gru": 3}[cell]
    assert T * B * I * G * H >= 1 << 24
    g = torch.Generator().manual_seed(7)
    u = lambda *s: (torch.rand(*s, generator=g) * 2 - 1) / H ** 0.5  # noqa: E731
    x, h0 = torch.randn(T, B, I, generator=g), torch.randn(B, H, generator=g)
    c0 = torch.randn(B, H, generator=g) if cell == "lstm" else None
    w_ih, w_hh, b_ih, b_hh = u(G * H, I), u(G * H, H), u(G * H), u(G * H)
    lengths = torch.randint(2, T, (B,), generator=g) if varlen else None
    if varlen:
        lengths[::3] = T  # a third runs every step; the rest leave most steps padded
    d = lambda t: None if t is None else t[None]  # noqa: E731
    with torch.no_grad():
        y = ops.forward(cell, x, h0[None], d(c0), w_ih[None], w_hh[None], b_ih[None],
                        b_hh[None], None, lengths, False, False, None, None, None, None, True)[0]
    step = takes_bf16_step(cell, B, H, H)
    full = slice(None) if lengths is None else lengths == T
    want, other = (rounded_reference(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, s)
                   for s in (step, not step))
    err, apart = (((y[:, full].double() - r[:, full]).norm() / r[:, full].norm()).item()
                  for r in (want, other))
    assert err < 2e-4 and err < apart / 5, (err, apart)
