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


def rounded_reference(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, rec_mask, bf16_step):
    """One direction of fastrnn::forward with bf16_gemms=True, in float64: the input
    projection (from bfloat16 operands, its product rounded to bfloat16 as torch's autocast
    matmul, when it has 2^24 multiply-adds or more) plus b_ih; the recurrent product from
    W_hh and the h fed to it (h * rec_mask) rounded to bfloat16 when bf16_step, exact
    otherwise. Returns y [T, B, P]."""
    if x.shape[0] * x.shape[1] * x.shape[2] * w_ih.shape[0] >= 1 << 24:
        gx = bf16(bf16(x) @ bf16(w_ih).t()) + b_ih.double()
    else:
        gx = x.double() @ w_ih.double().t() + b_ih.double()
    w = bf16(w_hh) if bf16_step else w_hh.double()
    h, c, ys = h0.double(), None if c0 is None else c0.double(), []
    for t in range(x.shape[0]):
        hin = h * rec_mask.double() if rec_mask is not None else h
        hg = (bf16(hin) if bf16_step else hin) @ w.t() + b_hh.double()
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


BF16_STEP = "avx512_bf16" in fastrnn.cpu_capabilities()["features"]


@pytest.mark.parametrize("case", [
    ("lstm", 1, 37, 0, False), ("lstm", 1, 300, 0, False), ("lstm", 2, 256, 129, False),
    ("gru", 1, 211, 0, True), ("gru", 1, 37, 0, True), ("rnn_tanh", 3, 400, 0, True),
    ("lstm", 8, 64, 0, False), ("rnn_tanh", 16, 300, 0, False), ("rnn_tanh", 1, 300, 0, False),
    ("lstm", 8, 256, 0, False), ("gru", 13, 211, 0, True), ("lstm", 5, 256, 129, True),
], ids=lambda c: "%s-B%d-H%d-proj%d%s" % (c[0], c[1], c[2], c[3], "-recdrop" if c[4] else ""))
def test_bf16_recurrent_step(case):
    """With bf16 GEMMs (CPU bf16 autocast), a batch small enough for the narrow tiles (any
    batch where bf16 products outpace float32 FMAs) and a W_hh of 512 KiB or more in
    float32, a CPU with AVX512_BF16 also runs the recurrent product from bfloat16 W_hh and h:
    the result is the bfloat16-rounding reference, within float32 rounding. Elsewhere
    (larger batches, smaller W_hh, other CPUs and instruction sets) the recurrent product
    stays float32."""
    from fastrnn import ops

    cell, B, H, proj, recdrop = case
    T, I, P = 6, 9, proj or H
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[cell]
    g = torch.Generator().manual_seed(B * 1000 + H)
    u = lambda *s: (torch.rand(*s, generator=g) * 2 - 1) / H ** 0.5  # noqa: E731
    x, h0 = torch.randn(T, B, I, generator=g), torch.randn(B, P, generator=g)
    c0 = torch.randn(B, H, generator=g) if cell == "lstm" else None
    w_ih, w_hh, b_ih, b_hh = u(G * H, I), u(G * H, P), u(G * H), u(G * H)
    w_hr = u(P, H) if proj else None
    mask = (torch.rand(B, P, generator=g) > 0.3).float() / 0.7 if recdrop else None
    narrow = B <= {"lstm": 3, "gru": 2, "rnn_tanh": 3}[cell]  # Isa::narrow_rows on AVX-512
    caps = fastrnn.cpu_capabilities()
    step = (narrow or caps["bfloat16_recurrent_step_all_batches"]) and \
        G * H * P * 4 >= 512 << 10 and caps["bfloat16_recurrent_step"]
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
    err = (y.double() - want).abs().max().item()
    assert err < 2e-5, err
    assert (y.double() - other).abs().max().item() > 20 * err  # the other path is told apart
