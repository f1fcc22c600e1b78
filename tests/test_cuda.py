"""The CUDA kernels: parity with the float64 CPU path and with torch.nn (cuDNN), lengths on
the GPU, low precision, streams and devices, opcheck. Skipped without a GPU.

Tolerances: float64 against the CPU path at 1e-9 (same algorithm, only the GEMMs' summation
order and the device's exp/tanh differ); float64 against cuDNN at PyTorch's own 5e-5 for
cuDNN vs CPU. float32, float16 and bfloat16 follow flash-attention's rule: the error against
a float64 reference on the same (rounded) inputs is at most twice torch.nn's own error in
that dtype, plus a few units of the dtype at the reference's scale. ReLU gradients take that
rule norm-wise (see test_low_precision_error).

TF32: fastrnn's float32 GEMMs are ATen's and follow torch.backends.cuda.matmul.allow_tf32,
as torch.mm does; the fixture below turns it (and cuDNN's) off for every test here, and
test_float32_follows_torch_tf32_switch turns it on.
"""
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from fastrnn import functional as F
from fastrnn import ops
from fastrnn import reference as R

from test_functional import (CELLS, call, leaves, lengths_for, make_inputs, op_args,
                             op_samples, opcheck_backward, torch_module, torch_run)
from test_layernorm import F32_NORMWISE, KINDS as LN_MODULES, randomize
from test_layernorm_ops import leaves as ln_leaves, ln_inputs, op_args as ln_op_args

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning"),
]
BUILT_WITH_CUDA = bool(getattr(fastrnn.ops._C, "cuda", False))
needs_cuda_build = pytest.mark.skipif(not BUILT_WITH_CUDA,
                                      reason="fastrnn was built without CUDA kernels")
DEV = "cuda"
CELL_PROJ = [(c, 0) for c in CELLS] + [("lstm", 3)]
CELL_PROJ_IDS = CELLS + ["lstm_proj"]


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 off, so float32 GEMMs (ours and cuDNN's) keep their 24 bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def moved(inp, device=None, dtype=None):
    """Leaf copies of every tensor of `inp` on `device` (default: the GPU), optionally cast."""
    return {k: None if v is None else
            v.detach().to(device=device or DEV, dtype=dtype or v.dtype).requires_grad_()
            for k, v in inp.items()}


def out_weights(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def grads_of(outs, inputs, weights):
    """Gradients of sum(o * w) w.r.t. `inputs` (zeros where unused)."""
    loss = sum((o * w.to(device=o.device, dtype=o.dtype)).sum() for o, w in zip(outs, weights))
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs)]


def run(inp, cell, lengths=None, reverse=False, weights=None, **extras):
    """fastrnn.functional on `inp`'s device: outputs and the gradient of every leaf; extras
    (resets, zoneout_h, zoneout_c, rec_mask) are passed on."""
    outs = [o for o in call(F, cell, inp, lengths, reverse, **extras) if o is not None]
    names = list(leaves(inp))
    weights = weights or out_weights(outs)
    return outs, dict(zip(names, grads_of(outs, [inp[k] for k in names], weights)))


def assert_close_all(a, b, **tol):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.cpu(), y.cpu(), **tol, msg=lambda m: f"output {i}: {m}")


def assert_grads_close(ga, gb, **tol):
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k].cpu(), gb[k].cpu(), **tol, msg=lambda m: f"d{k}: {m}")


def test_built_with_cuda():
    assert BUILT_WITH_CUDA, (
        "a GPU is present but fastrnn was built without CUDA kernels: rebuild with a CUDA "
        "build of torch and nvcc on PATH (see cmake/cuda.cmake)")


# ---- float64 against the CPU path -----------------------------------------------------

SIZES = [(1, 1, 1, 1), (5, 3, 4, 6), (9, 16, 20, 100), (40, 7, 12, 33)]


@needs_cuda_build
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_matches_cpu_fp64(cell, proj, bias, reverse, lengths, size):
    T, B, I, H = size
    if proj and proj >= H:
        pytest.skip("proj_size must be smaller than hidden_size")
    inp = make_inputs(cell, T, B, I, H, bias=bias, proj=proj)
    lens = lengths_for(lengths, T, B)
    ref_out, ref_g = run(inp, cell, lens, reverse)
    gpu = moved(inp)
    out, g = run(gpu, cell, None if lens is None else lens.to(DEV), reverse)
    assert all(o.device.type == "cuda" for o in out)
    assert_close_all(out, ref_out, atol=1e-9, rtol=1e-7)
    assert_grads_close(g, ref_g, atol=1e-9, rtol=1e-7)


@needs_cuda_build
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_bidirectional_layer_matches_cpu(cell, proj, lengths):
    T, B, I, H = 11, 9, 6, 24
    dirs = [make_inputs(cell, T, B, I, H, proj=proj, seed=s) for s in (1, 2)]
    dirs[1]["x"] = dirs[0]["x"]
    lens = lengths_for(lengths, T, B)
    keys = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

    def both(dirs, lens):
        c0 = torch.stack([d["c0"] for d in dirs]) if cell == "lstm" else None
        outs = F.layer(cell, dirs[0]["x"], torch.stack([d["h0"] for d in dirs]), c0,
                       [tuple(d[k] for k in keys) for d in dirs], lens)
        outs = [o for o in outs if o is not None]
        inputs = [dirs[0]["x"]] + [v for d in dirs for k, v in leaves(d).items() if k != "x"]
        return outs, grads_of(outs, inputs, out_weights(outs))

    ref_out, ref_g = both(dirs, lens)
    gpu = [moved(d) for d in dirs]
    gpu[1]["x"] = gpu[0]["x"]
    out, g = both(gpu, None if lens is None else lens.to(DEV))
    assert_close_all(out, ref_out, atol=1e-9, rtol=1e-7)
    assert_close_all(g, ref_g, atol=1e-9, rtol=1e-7)


# ---- against torch.nn on the GPU (cuDNN) ----------------------------------------------

def torch_grads(cell, mod, inp, outs, weights):
    inputs = [inp["x"], inp["h0"]] + ([inp["c0"]] if cell == "lstm" else [])
    params = [getattr(mod, n) for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                        "bias_hh_l0", "weight_hr_l0") if hasattr(mod, n)]
    return grads_of(outs, inputs + params, weights)


def ours_in_torch_order(cell, g):
    keys = ["x", "h0"] + (["c0"] if cell == "lstm" else []) + \
        [k for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr") if k in g]
    return [g[k] for k in keys]


@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_matches_torch_nn_cuda(cell, proj, reverse, lengths, dtype):
    T, B, I, H = 12, 6, 5, 7
    inp = moved(make_inputs(cell, T, B, I, H, proj=proj), dtype=dtype)
    lens = lengths_for(lengths, T, B)
    mod = torch_module(cell, moved(inp, "cpu")).to(DEV)
    out, g = run(inp, cell, None if lens is None else lens.to(DEV), reverse)
    ref = torch_run(cell, mod, inp["x"], inp["h0"], inp["c0"], lens, reverse)
    ref_g = torch_grads(cell, mod, inp, ref, out_weights(out))
    ours = out + ours_in_torch_order(cell, g)
    theirs = list(ref) + ref_g
    if dtype == torch.float64:
        assert_close_all(ours, theirs, atol=5e-5, rtol=0)
        return
    # float32: both against float64 on the same inputs. cuDNN's float32 RNNs (TF32 off) were
    # measured on an H100 at 10-50x fastrnn's error here (up to 1e-5 of the gradients'
    # scale), so a direct comparison at float32 tolerances would test cuDNN's rounding.
    exact_out, exact_g = run(moved(inp, "cpu", torch.float64), cell, lens, reverse)
    exact = exact_out + ours_in_torch_order(cell, exact_g)
    eps = torch.finfo(torch.float32).eps
    for i, (a, b, e) in enumerate(zip(ours, theirs, exact)):
        e_ours, e_torch = max_err(a, e), max_err(b, e)
        floor = 4 * eps * e.abs().max().item() if e.numel() else 0.0
        assert e_ours <= 2 * e_torch + floor, (
            f"output {i}: fastrnn error {e_ours:.3g} > 2 x cuDNN's {e_torch:.3g} + {floor:.3g}")


# ---- low precision: at most twice torch's own error -------------------------------------

def max_err(a, ref):
    return (a.double().cpu() - ref.double().cpu()).abs().max().item() if ref.numel() else 0.0


def norm_err(a, ref):
    return (a.double().cpu() - ref.double().cpu()).norm().item()


@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_low_precision_error(cell, proj, reverse, lengths, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    T, B, I, H = 24, 8, 32, 64
    base = make_inputs(cell, T, B, I, H, proj=proj * 8)
    low_cpu = moved(base, "cpu", dtype)  # the rounded inputs everyone starts from
    lens = lengths_for(lengths, T, B)

    ref_inp = moved(low_cpu, "cpu", torch.float64)
    weights = [w.to(dtype).double() for w in out_weights(call(F, cell, ref_inp)[:3])]
    ref_out, ref_g = run(ref_inp, cell, lens, reverse, weights)

    ours_inp = moved(low_cpu)
    out, g = run(ours_inp, cell, None if lens is None else lens.to(DEV), reverse, weights)
    assert all(o.dtype == dtype for o in out) and all(v.dtype == dtype for v in g.values())

    mod = torch_module(cell, moved(low_cpu, "cpu")).to(DEV)
    torch_inp = moved(low_cpu)
    t_out = torch_run(cell, mod, torch_inp["x"], torch_inp["h0"], torch_inp["c0"], lens, reverse)
    t_g = torch_grads(cell, mod, torch_inp, t_out, weights)

    eps = torch.finfo(dtype).eps
    names = ["y", "h_n", "c_n"][:len(out)]
    pairs = list(zip(names, out, t_out, ref_out))
    pairs += [("d" + k, a, b, ref_g[k]) for k, a, b in
              zip(["x", "h0"] + (["c0"] if cell == "lstm" else []) +
                  [k for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr") if k in g],
                  ours_in_torch_order(cell, g), t_g)]
    for name, ours, theirs, ref in pairs:
        if cell == "rnn_relu" and name.startswith("d"):
            # A pre-activation within rounding of 0 lands on either side of the ReLU, in
            # each implementation independently. Where one flips, its gradient there is off
            # by a whole dL/dh, and the recurrence spreads that: an elementwise rule fails
            # for reasons that are no kernel bug. Flips come in proportion to eps, so their
            # error is about sqrt(eps) of the gradient's norm: a norm-wise bound with room
            # for it. (fastrnn's CUDA arithmetic, emulated on the CPU at this shape over 1200
            # seeds, reached 1.9 sqrt(eps) with no allowance for torch's own flips; a kernel
            # bug is an error of the order of the gradient itself.)
            e_ours, e_torch = norm_err(ours, ref), norm_err(theirs, ref)
            floor = 4 * eps ** 0.5 * ref.double().norm().item()
        else:
            e_ours, e_torch = max_err(ours, ref), max_err(theirs, ref)
            floor = eps * ref.abs().max().item() if ref.numel() else 0.0
        assert e_ours <= 2 * e_torch + floor, (
            f"{name}: fastrnn error {e_ours:.3g} > 2 x torch.nn's {e_torch:.3g} + {floor:.3g}")


# ---- lengths on the GPU ----------------------------------------------------------------

@needs_cuda_build
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_gpu_lengths_need_no_host_sync(cell, proj):
    T, B, I, H = 7, 5, 4, 8
    inp = moved(make_inputs(cell, T, B, I, H, proj=proj))
    lens = lengths_for("mixed", T, B).to(DEV)
    weights = [w.to(DEV) for w in out_weights([torch.empty(T, B, proj or H),
                                                torch.empty(B, proj or H),
                                                torch.empty(B, H)])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rev in (False, True):
            out = [o for o in call(F, cell, inp, lens, rev) if o is not None]
            grads_of(out, list(leaves(inp).values()), weights[:len(out)])
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda_build
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_out_of_range_gpu_lengths_act_clamped(cell, reverse):
    """On the GPU lengths are not range-checked (that would need a sync): values below 0
    act as 0, values above T as T."""
    T, B, I, H = 6, 4, 3, 5
    inp = moved(make_inputs(cell, T, B, I, H))
    with torch.no_grad():
        wild = call(F, cell, inp, torch.tensor([-3, T + 4, 2, 0], device=DEV), reverse)
        tame = call(F, cell, inp, torch.tensor([0, T, 2, 0], device=DEV), reverse)
    for a, b in zip(wild, tame):
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- modules on the GPU against torch.nn on the GPU --------------------------------------

MODULES = {"lstm": (torch.nn.LSTM, fastrnn.LSTM, {}), "gru": (torch.nn.GRU, fastrnn.GRU, {}),
           "rnn_tanh": (torch.nn.RNN, fastrnn.RNN, {"nonlinearity": "tanh"}),
           "rnn_relu": (torch.nn.RNN, fastrnn.RNN, {"nonlinearity": "relu"})}


@needs_cuda_build
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_modules_match_torch_nn_cuda(kind, proj, packed):
    torch.manual_seed(0)
    T, B, I, H = 9, 5, 6, 10
    ref_cls, fast_cls, extra = MODULES[kind]
    kwargs = dict(num_layers=3, bidirectional=True, dtype=torch.float64, **extra)
    if proj:
        kwargs["proj_size"] = proj
    ref = ref_cls(I, H, **kwargs)
    fast = fast_cls(I, H, **kwargs)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([4, T, 1, 7, 2])  # unsorted, on the CPU as torch requires

    def go(mod):
        xl = x.to(DEV).requires_grad_()
        inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
        y, state = mod(inp)
        if packed:
            assert isinstance(y, PackedSequence)
            y = y.data
        outs = [y] + (list(state) if isinstance(state, tuple) else [state])
        return outs, grads_of(outs, [xl] + list(mod.parameters()), out_weights(outs))

    out, g = go(fast)
    ref_out, ref_g = go(ref)
    assert all(o.is_cuda for o in out)
    assert_close_all(out, ref_out, atol=5e-5, rtol=0)
    assert_close_all(g, ref_g, atol=5e-5, rtol=0)


@needs_cuda_build
@pytest.mark.parametrize("kind", CELLS)
def test_cells_match_torch_nn_cuda(kind):
    torch.manual_seed(0)
    cls = {"lstm": (torch.nn.LSTMCell, fastrnn.LSTMCell, {}),
           "gru": (torch.nn.GRUCell, fastrnn.GRUCell, {}),
           "rnn_tanh": (torch.nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "tanh"}),
           "rnn_relu": (torch.nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "relu"})}[kind]
    ref = cls[0](4, 6, dtype=torch.float64, **cls[2]).cuda()
    fast = cls[1](4, 6, dtype=torch.float64, **cls[2]).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64, device=DEV)
    a, b = fast(x), ref(x)
    assert_close_all(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b],
                     atol=1e-9, rtol=1e-7)


# ---- every output element written ------------------------------------------------------

def poison():
    """Fill blocks of the caching allocator's small and large pools with NaN and free them:
    the next allocations reuse them, NaNs and all."""
    blocks = [torch.full((n,), float("nan"), dtype=torch.float64, device=DEV)
              for n in [1 << 12] * 64 + [1 << 15] * 64 + [1 << 20] * 8]
    del blocks


@needs_cuda_build
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_every_output_element_written(cell, proj):
    """The caching allocator hands out NaN-poisoned memory; no NaN may survive."""
    T, B, I, H = 8, 5, 4, 12
    inp = moved(make_inputs(cell, T, B, I, H, proj=proj))
    lens = lengths_for("mixed", T, B).to(DEV)
    for reverse in (False, True):
        poison()
        keys = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
        args = (cell, inp["x"], inp["h0"].unsqueeze(0),
                None if inp["c0"] is None else inp["c0"].unsqueeze(0),
                *[None if inp[k] is None else inp[k].unsqueeze(0) for k in keys],
                lens, reverse, True)
        with torch.no_grad():
            fwd = ops.forward(*[a.detach() if torch.is_tensor(a) else a for a in args])
            for t in fwd:
                assert not t.isnan().any()
            y, h_n, c_n, gates, hprev, cprev, m = fwd
            poison()
            bwd = ops.backward(cell, torch.randn_like(y), torch.randn_like(h_n),
                               torch.randn_like(c_n) if cell == "lstm" else None,
                               inp["x"].detach(), args[4].detach(), args[5].detach(),
                               None if args[8] is None else args[8].detach(), lens, gates,
                               hprev, cprev, m, reverse, True)
            for t in bwd:
                assert not t.isnan().any()


@needs_cuda_build
@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch_and_sequence(cell):
    for T, B in [(0, 3), (4, 0), (0, 0)]:
        inp = moved(make_inputs(cell, T, B, 3, 5))
        out, g = run(inp, cell)
        ref_out, ref_g = run(moved(inp, "cpu"), cell)
        assert_close_all(out, ref_out, atol=0, rtol=0)
        assert_grads_close(g, ref_g, atol=0, rtol=0)


# ---- streams and devices ---------------------------------------------------------------

@needs_cuda_build
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_side_stream(cell, proj):
    """Inputs produced on a side stream, behind a long sleep: kernels or GEMMs that ran on
    any other stream would read them before they exist."""
    T, B, I, H = 10, 6, 8, 16
    base = make_inputs(cell, T, B, I, H, proj=proj)
    lens = lengths_for("mixed", T, B)
    ref_out, ref_g = run(base, cell, lens, True)
    # Everything on the GPU before the sleep: a host-to-device copy after it would wait for
    # the sleep (copies from pageable memory synchronise), and the inputs would be ready
    # before anything could read them on the wrong stream.
    weights = [w.to(DEV) for w in out_weights(ref_out)]
    gpu, lens_gpu = moved(base), lens.to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the side stream: the BLAS workspace and the
        run(gpu, cell, lens_gpu, True, weights)  # cached blocks below need no cudaMalloc
    side.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time
        inp = {k: None if v is None else (v * 1).detach().requires_grad_() for k, v in gpu.items()}
        out, g = run(inp, cell, lens_gpu + 0, True, weights)
        # Nothing above may have waited for the sleep, or the test could not fail.
        assert not side.query(), "the host waited for the side stream: the test proves nothing"
    side.synchronize()
    assert_close_all(out, ref_out, atol=1e-9, rtol=1e-7)
    assert_grads_close(g, ref_g, atol=1e-9, rtol=1e-7)


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_second_device(cell, proj):
    """Tensors on cuda:1 while cuda:0 is current: kernels, handle and stream must follow."""
    T, B, I, H = 10, 6, 8, 16
    base = make_inputs(cell, T, B, I, H, proj=proj)
    lens = lengths_for("mixed", T, B)
    ref_out, ref_g = run(base, cell, lens)
    with torch.cuda.device(0):
        inp = moved(base, "cuda:1")
        out, g = run(inp, cell, lens.to("cuda:1"))
    assert all(o.device == torch.device("cuda:1") for o in out)
    assert all(v.device == torch.device("cuda:1") for v in g.values())
    assert_close_all(out, ref_out, atol=1e-9, rtol=1e-7)
    assert_grads_close(g, ref_g, atol=1e-9, rtol=1e-7)


# ---- the persistent kernels (csrc/kernels/cuda/persistent.cu) ------------------------------

@pytest.fixture
def persistent():
    """The persistent kernels on; yields a function that says how many forward and backward
    calls they have run since."""
    ops._C.set_cuda_persistent(True)
    start = ops._C.cuda_persistent_runs()
    yield lambda: ops._C.cuda_persistent_runs() - start
    ops._C.set_cuda_persistent(False)


# (T, B, I, H): one unit; odd sizes; a batch over one warp pass (40 > 32 rows); B=1 with more
# units than SMs per block slice (H=300); several staged row chunks and warp passes (B=70).
PERSISTENT_SIZES = [(1, 1, 1, 1), (9, 3, 5, 7), (6, 40, 16, 64), (5, 1, 8, 300), (4, 70, 12, 130)]


@needs_cuda_build
@pytest.mark.parametrize("size", PERSISTENT_SIZES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_persistent_error(persistent, cell, dtype, reverse, lengths, size):
    """Outputs and every gradient within twice the per-step path's error against float64 on
    the same inputs, plus a few units of the dtype; and both persistent kernels did run."""
    T, B, I, H = size
    base = make_inputs(cell, T, B, I, H)
    low = moved(base, "cpu", dtype)
    lens = lengths_for(lengths, T, B)
    exact_out, exact_g = run(moved(low, "cpu", torch.float64), cell, lens, reverse)
    dev_lens = None if lens is None else lens.to(DEV)
    out, g = run(moved(low), cell, dev_lens, reverse)
    assert persistent() == 2  # the forward and the backward
    ops._C.set_cuda_persistent(False)
    step_out, step_g = run(moved(low), cell, dev_lens, reverse)
    assert persistent() == 2
    eps = torch.finfo(dtype).eps
    pairs = list(zip(out, step_out, exact_out)) + [(g[k], step_g[k], exact_g[k]) for k in g]
    for i, (ours, step, ref) in enumerate(pairs):
        assert ours.dtype == dtype
        floor = 4 * eps * ref.abs().max().item() if ref.numel() else 0.0
        if cell == "rnn_relu" and i >= len(out):
            e_ours, e_step = norm_err(ours, ref), norm_err(step, ref)  # see test_low_precision_error
            floor = 4 * eps ** 0.5 * ref.double().norm().item()
        else:
            e_ours, e_step = max_err(ours, ref), max_err(step, ref)
        assert e_ours <= 2 * e_step + floor, (
            f"result {i}: persistent error {e_ours:.3g} > 2 x per-step {e_step:.3g} + {floor:.3g}")


@needs_cuda_build
@pytest.mark.parametrize("kind, proj", [("LSTM", 0), ("GRU", 0), ("RNN", 0), ("LSTM", 4)])
def test_persistent_modules(persistent, kind, proj):
    """Two layers, both directions in one launch, batch_first, lengths: the same outputs and
    parameter gradients as the per-step path. proj_size takes the per-step path."""
    torch.manual_seed(0)
    extra = {"proj_size": proj} if proj else {}
    mod = getattr(fastrnn, kind)(6, 24, num_layers=2, bidirectional=True, batch_first=True,
                                 **extra).to(DEV)
    x = torch.randn(5, 9, 6, device=DEV)
    lens = torch.tensor([9, 3, 7, 1, 5], device=DEV)

    def result():
        mod.zero_grad()
        y, _ = mod(x, lengths=lens)
        y.pow(2).sum().backward()
        return [y.detach()] + [p.grad.clone() for p in mod.parameters()]

    fast = result()
    # one forward and one backward launch per layer, both directions in each
    assert persistent() == (0 if proj else 4)
    ops._C.set_cuda_persistent(False)
    for a, b in zip(fast, result()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@needs_cuda_build
def test_persistent_falls_back_when_too_large(persistent):
    """A W_hh slice that does not fit in shared memory runs the per-step path, correctly."""
    H = 4096  # float32 LSTM: 256 MB of W_hh, about 2 MB per block on a 132-SM GPU
    lstm = fastrnn.LSTM(8, H).to(DEV)
    x = torch.randn(3, 2, 8, device=DEV)
    exact = fastrnn.LSTM(8, H).double()
    exact.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        y, _ = lstm(x)
        assert persistent() == 0
        want, _ = exact(x.double().cpu())
    torch.testing.assert_close(y.double().cpu(), want, atol=1e-5, rtol=1e-5)


@needs_cuda_build
def test_persistent_long_sequence(persistent):
    """T = 100,000 steps (cuDNN stops at 65,535): the same as the per-step path."""
    torch.manual_seed(0)
    gru = fastrnn.GRU(4, 16).to(DEV)
    x = torch.randn(100_000, 2, 4, device=DEV)
    with torch.no_grad():
        y, h = gru(x)
        assert persistent() == 1
        ops._C.set_cuda_persistent(False)
        y_step, h_step = gru(x)
    torch.testing.assert_close(y, y_step, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h, h_step, atol=1e-5, rtol=1e-4)


# ---- argument checks of a direct backward call -------------------------------------------

def _backward_args(cell="lstm"):
    """A valid fastrnn::backward call on the GPU, from a real forward (D = 1)."""
    lens = torch.tensor([3, 1, 2], device=DEV)
    args = tuple(a.detach().to(DEV) if torch.is_tensor(a) else a
                 for a in op_args(cell, 1, lens))
    with torch.no_grad():
        y, h_n, c_n, gates, hprev, cprev, m = ops.forward(*args)
    return dict(cell=cell, dy=torch.randn_like(y), dh_n=torch.randn_like(h_n),
                dc_n=torch.randn_like(c_n) if cell == "lstm" else None, x=args[1],
                w_ih=args[4], w_hh=args[5], w_hr=None, lengths=lens, gates=gates,
                hprev=hprev, cprev=cprev, m=m, reverse=False, input_grad=True)


BAD_BACKWARD = {
    "lengths_on_cpu": (lambda a: a["lengths"].cpu(), "lengths", "lengths is on cpu but input x is on cuda"),
    "lengths_int32": (lambda a: a["lengths"].int(), "lengths", "lengths must be int64"),
    "lengths_shape": (lambda a: a["lengths"][:2], "lengths", r"lengths must have shape \[3\]"),
    "dy_on_cpu": (lambda a: a["dy"].cpu(), "dy", "dy is on cpu"),
    "dy_dtype": (lambda a: a["dy"].float(), "dy", "dy has dtype Float"),
    "dy_shape": (lambda a: a["dy"][1:], "dy", "dy must have shape"),
    "dh_n_on_cpu": (lambda a: a["dh_n"].cpu(), "dh_n", "dh_n is on cpu"),
    "dh_n_shape": (lambda a: a["dh_n"][0], "dh_n", "dh_n must have shape"),
    "dc_n_on_cpu": (lambda a: a["dc_n"].cpu(), "dc_n", "dc_n is on cpu"),
    "cprev_on_cpu": (lambda a: a["cprev"].cpu(), "cprev", "cprev is on cpu"),
    "w_hh_on_cpu": (lambda a: a["w_hh"].cpu(), "w_hh", "w_hh is on cpu"),
    "gates_on_cpu": (lambda a: a["gates"].cpu(), "gates", "gates is on cpu"),
    "hprev_shape": (lambda a: a["hprev"].flatten()[:-1], "hprev", "save=False|hprev must have shape"),
}


@needs_cuda_build
@pytest.mark.parametrize("case", BAD_BACKWARD)
def test_backward_checks_every_argument(case):
    """A direct fastrnn::backward call with a tensor on the wrong device (or of the wrong
    dtype or shape) fails with a clear message; a host pointer never reaches a kernel,
    where it would be an illegal memory access."""
    make, key, match = BAD_BACKWARD[case]
    args = _backward_args()
    args[key] = make(args)
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):
        ops.backward(*args.values())
    torch.cuda.synchronize()  # no kernel ran on bad pointers: the context is still healthy


@needs_cuda_build
def test_backward_accepts_what_autograd_passes():
    """None for unused gradients, and the empty gradient of an empty c_n output."""
    for cell in CELLS:
        args = _backward_args(cell)
        args["dy"] = None
        if cell != "lstm":
            args["dc_n"] = torch.empty(0, device=DEV, dtype=args["x"].dtype)
        with torch.no_grad():
            ops.backward(*args.values())
    torch.cuda.synchronize()


# ---- TF32 -----------------------------------------------------------------------------------

@needs_cuda_build
@pytest.mark.parametrize("cell", CELLS)
def test_float32_follows_torch_tf32_switch(cell):
    """float32 GEMMs are ATen's, so torch.backends.cuda.matmul.allow_tf32 (set by
    torch.set_float32_matmul_precision) decides, as for torch.mm: exact FP32 when off (the
    fixture's setting, torch's default), TF32 tensor cores when on."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs compute capability 8.0+")
    T, B, I, H = 6, 64, 256, 256  # large enough for cuBLAS to pick tensor-core kernels
    inp = make_inputs(cell, T, B, I, H)
    with torch.no_grad():
        ref = call(F, cell, inp)[0]  # float64, CPU
        gpu = moved(inp, dtype=torch.float32)
        exact = call(F, cell, gpu)[0]
        torch.backends.cuda.matmul.allow_tf32 = True  # the fixture restores it
        fast = call(F, cell, gpu)[0]
    scale = ref.abs().max().item()
    e_exact, e_fast = max_err(exact, ref) / scale, max_err(fast, ref) / scale
    assert e_exact < 1e-5, f"float32 with TF32 off: relative error {e_exact:.2g}"
    assert e_exact < e_fast < 2e-2, (
        f"TF32 on: relative error {e_fast:.2g} (off: {e_exact:.2g}); TF32 unused or broken")


# ---- opcheck -----------------------------------------------------------------------------

def to_cuda(args):
    return tuple(a.detach().to(DEV).requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                 for a in args)


def _op_id(a):
    return (f"{a[0]}-D{a[5].shape[0]}-{'proj' if a[8] is not None else 'noproj'}"
            f"-{'len' if a[9] is not None else 'nolen'}-{'rev' if a[10] else 'fwd'}")


@needs_cuda_build
@pytest.mark.parametrize("args", list(op_samples()), ids=_op_id)
def test_opcheck_forward_cuda(args):
    torch.library.opcheck(ops.forward, to_cuda(args))


@needs_cuda_build
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_backward_cuda(cell, D):
    opcheck_backward(cell, D, DEV)



# ---- resets, zoneout and recurrent dropout ------------------------------------------------

def extras_for(cell, inp, which, seed):
    """CPU float64 arguments of the extras named in `which` for `inp`'s layer."""
    from test_recurrent_dropout import mask_for
    from test_resets import random_resets
    from test_zoneout import zoneout_for
    T, B, _ = inp["x"].shape
    out = {}
    if "resets" in which:
        out["resets"] = random_resets(T, B, seed=seed, p=0.35)
    if "zoneout" in which:
        out["zoneout_h"], out["zoneout_c"] = zoneout_for(cell, inp, "mix", seed)
    if "dropout" in which:
        out["rec_mask"] = mask_for(inp, "drop", seed)
    return out


EXTRAS = ["resets", "zoneout", "dropout", "resets+zoneout+dropout"]


@needs_cuda_build
@pytest.mark.parametrize("size", [(1, 1, 2, 3), (7, 5, 4, 6), (12, 9, 8, 33)],
                         ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("which", EXTRAS)
@pytest.mark.parametrize("cell, proj", CELL_PROJ, ids=CELL_PROJ_IDS)
def test_extras_match_cpu_fp64(cell, proj, which, reverse, lengths, size):
    """Resets, zoneout and recurrent dropout on the GPU: every output and gradient as the
    CPU kernels give them, in float64."""
    T, B, I, H = size
    if proj and proj >= H:
        pytest.skip("proj_size must be smaller than hidden_size")
    inp = make_inputs(cell, T, B, I, H, proj=proj, seed=T + B)
    lens = lengths_for(lengths, T, B)
    extras = extras_for(cell, inp, which, seed=T * B)
    ref_out, ref_g = run(inp, cell, lens, reverse, **extras)
    gpu_extras = {k: v.to(DEV) for k, v in extras.items() if v is not None}
    out, g = run(moved(inp), cell, None if lens is None else lens.to(DEV), reverse,
                 **gpu_extras)
    assert_close_all(out, ref_out, atol=1e-9, rtol=1e-7)
    assert_grads_close(g, ref_g, atol=1e-9, rtol=1e-7)


@needs_cuda_build
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_extras_modules_match_cpu(kind):
    """Two bidirectional layers with resets and zoneout, lengths, in eval mode (zoneout's
    deterministic mix; the training masks come from each device's own generator, and the
    functional test above checks the kernels with given masks): the CPU's outputs, final
    states and gradients."""
    torch.manual_seed(0)
    cpu = getattr(fastrnn, kind)(4, 6, num_layers=2, bidirectional=True, zoneout=0.3,
                                 recurrent_dropout=0.2).double().eval()
    gpu = copy.deepcopy(cpu).to(DEV)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    resets = torch.rand(8, 3) < 0.3
    lens = torch.tensor([8, 5, 2])

    def result(mod, device):
        xd = x.to(device).requires_grad_()
        y, h = mod(xd, resets=resets.to(device), lengths=lens.to(device))
        states = h if kind == "LSTM" else (h,)
        (y.pow(2).sum() + sum(s.sum() for s in states)).backward()
        return [y, *states, xd.grad] + [p.grad for p in mod.parameters()]

    for a, b in zip(result(gpu, DEV), result(cpu, "cpu")):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), atol=1e-9, rtol=1e-7)


# ---- LayerNorm LSTM/GRU (fastrnn.functional.ln_layer, fastrnn.LayerNormLSTM/GRU) ------------

LN_CELLS = ["lstm", "gru"]


def ln_moved(x, h0, c0, weights, device=DEV, dtype=None):
    """Leaf copies of ln_layer's x, h0, c0 and per-direction weight tuples on `device`,
    optionally cast."""
    def mv(t):
        return None if t is None else (
            t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_())
    return mv(x), mv(h0), mv(c0), [tuple(mv(w) for w in ws) for ws in weights]


def ln_run(fn, cell, x, h0, c0, weights, lengths=None, reverse=False, cot=None, **extras):
    """fn (fastrnn.functional.ln_layer or fastrnn.reference.ln_layer): its outputs and the
    gradients of sum(o * cot) w.r.t. x, h0, c0 and every weight (the LayerNorms' included);
    cot: float64 cotangents, default out_weights'."""
    outs = [o for o in fn(cell, x, h0, c0, weights, lengths, reverse, **extras) if o is not None]
    return outs, grads_of(outs, ln_leaves(x, h0, c0, weights), cot or out_weights(outs))


def ln_extras(cell, D, T, B, H, which, seed):
    """CPU float64 extras for ln_layer, as named in `which`: resets [T, B]; zoneout weights
    [D, T, B, H], h's a mix in [0, 1) as eval mode gives it, LSTM's c 0/1 as training draws
    it; a recurrent dropout mask [D, B, H]. Given, so both devices see the same values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    if "resets" in which:
        out["resets"] = torch.rand(T, B, generator=g) < 0.3
    if "zoneout" in which:
        out["zoneout_h"] = torch.rand(D, T, B, H, generator=g, dtype=torch.float64)
        if cell == "lstm":
            out["zoneout_c"] = torch.bernoulli(
                torch.full((D, T, B, H), 0.3, dtype=torch.float64), generator=g)
    if "dropout" in which:
        out["rec_mask"] = torch.bernoulli(
            torch.full((D, B, H), 0.7, dtype=torch.float64), generator=g) / 0.7
    return out


def gpu_lengths(lens):
    return None if lens is None else lens.to(DEV)


LN_SIZES = [(5, 3, 4, 7), (9, 6, 5, 33), (4, 16, 6, 130), (3, 2, 3, 300)]


@needs_cuda_build
@pytest.mark.parametrize("size", LN_SIZES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", LN_CELLS)
def test_ln_matches_cpu_fp64(cell, D, reverse, lengths, size):
    """A LayerNorm layer on the GPU: outputs, final states and the gradients of the input,
    the initial state and every weight (LayerNorms' included) as the CPU kernels give
    them, in float64. H from one warp's worth of units to more units than a block has
    threads."""
    T, B, I, H = size
    x, h0, c0, weights, _ = ln_inputs(cell, D, T, B, I, H, seed=T + H)
    lens = lengths_for(lengths, T, B)
    ref_out, ref_g = ln_run(F.ln_layer, cell, x, h0, c0, weights, lens, reverse)
    out, g = ln_run(F.ln_layer, cell, *ln_moved(x, h0, c0, weights), gpu_lengths(lens), reverse)
    assert all(o.is_cuda for o in out) and all(v.is_cuda for v in g)
    assert_close_all(out, ref_out, atol=1e-9, rtol=1e-7)
    assert_close_all(g, ref_g, atol=1e-9, rtol=1e-7)


@needs_cuda_build
@pytest.mark.parametrize("size", [(1, 1, 2, 3), (7, 5, 4, 33)], ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("which", EXTRAS)
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", LN_CELLS)
def test_ln_extras_match_cpu_fp64(cell, D, which, reverse, lengths, size):
    """Resets, zoneout and recurrent dropout in LayerNorm layers on the GPU: every output
    and gradient as the CPU kernels give them, in float64."""
    T, B, I, H = size
    x, h0, c0, weights, _ = ln_inputs(cell, D, T, B, I, H, seed=T * B)
    lens = lengths_for(lengths, T, B)
    extras = ln_extras(cell, D, T, B, H, which, seed=T + B)
    ref_out, ref_g = ln_run(F.ln_layer, cell, x, h0, c0, weights, lens, reverse, **extras)
    out, g = ln_run(F.ln_layer, cell, *ln_moved(x, h0, c0, weights), gpu_lengths(lens), reverse,
                    **{k: v.to(DEV) for k, v in extras.items()})
    assert_close_all(out, ref_out, atol=1e-9, rtol=1e-7)
    assert_close_all(g, ref_g, atol=1e-9, rtol=1e-7)


@needs_cuda_build
@pytest.mark.parametrize("form", ["lengths+resets", "packed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", LN_CELLS)
def test_ln_modules_match_cpu(cell, bias, form):
    """LayerNormLSTM/GRU, two bidirectional layers with every regulariser, in eval mode
    (zoneout's deterministic mix; in training each device draws its masks from its own
    generator, which the functional tests above replace with given masks), with lengths
    and resets or a PackedSequence: the CPU's outputs, final states and the gradients of
    the input, the initial state and every parameter, in float64."""
    torch.manual_seed(0)
    T, B, I, H = 8, 3, 4, 6
    cpu = randomize(LN_MODULES[cell](I, H, num_layers=2, bidirectional=True, bias=bias,
                                     dropout=0.1, zoneout=0.3, recurrent_dropout=0.2,
                                     weight_dropout=0.2, dtype=torch.float64)).eval()
    gpu = copy.deepcopy(cpu).to(DEV)
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = [torch.randn(4, B, H, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1)]
    resets = torch.rand(T, B) < 0.3
    lens = torch.tensor([T, 5, 2])

    def result(mod, device):
        xd = x.to(device).requires_grad_()
        hd = [h.to(device).requires_grad_() for h in hx]
        h_in = tuple(hd) if cell == "lstm" else hd[0]
        if form == "packed":
            y, state = mod(pack_padded_sequence(xd, lens, enforce_sorted=False), h_in)
            y = y.data
        else:
            y, state = mod(xd, h_in, lengths=lens.to(device), resets=resets.to(device))
        outs = [y, *(state if cell == "lstm" else (state,))]
        return outs + grads_of(outs, [xd, *hd, *mod.parameters()], out_weights(outs))

    got = result(gpu, DEV)
    assert all(t.is_cuda for t in got)
    for a, b in zip(got, result(cpu, "cpu")):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), atol=1e-9, rtol=1e-7)


@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("lengths", ["none", "mixed"])
@pytest.mark.parametrize("cell", LN_CELLS)
def test_ln_low_precision_error(cell, lengths, dtype):
    """float32, float16 and bfloat16 LayerNorm layers (both directions) on the GPU against
    the float64 CPU kernels on the same rounded inputs. float32: the norm-wise relative
    error of every output and gradient within F32_NORMWISE, as test_layernorm.py checks
    float32 (parameter gradients sum over every step and row, where summation order alone
    moves single elements). float16/bfloat16: at most twice the error of the per-step
    reference (fastrnn.reference, torch's own ops) run on the GPU in that dtype, plus one
    unit of the dtype at the reference's scale; torch.nn has no LayerNorm LSTM or GRU to
    compare with, the reference is torch's own result of the same math."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    T, B, I, H, D = 24, 8, 32, 64, 2
    x, h0, c0, weights, _ = ln_inputs(cell, D, T, B, I, H, seed=5)
    low = ln_moved(x, h0, c0, weights, "cpu", dtype)  # the rounded inputs everyone starts from
    lens = lengths_for(lengths, T, B)
    ref_inp = ln_moved(*low, "cpu", torch.float64)
    outs = F.ln_layer(cell, *ref_inp, lens)
    cot = [w.to(dtype).double() for w in out_weights([o for o in outs if o is not None])]
    ref_out, ref_g = ln_run(F.ln_layer, cell, *ref_inp, lens, cot=cot)
    out, g = ln_run(F.ln_layer, cell, *ln_moved(*low), gpu_lengths(lens), cot=cot)
    assert all(o.dtype == dtype for o in out) and all(v.dtype == dtype for v in g)
    names = ["y", "h_n", "c_n"][:len(out)] + [f"grad {i}" for i in range(len(g))]

    if dtype == torch.float32:
        for name, ours, ref in zip(names, out + g, ref_out + ref_g):
            err = norm_err(ours, ref) / max(ref.double().norm().item(), 1e-30)
            assert err <= F32_NORMWISE, f"{name}: norm-wise relative error {err:.1e}"
        return
    t_out, t_g = ln_run(R.ln_layer, cell, *ln_moved(*low), gpu_lengths(lens), cot=cot)
    eps = torch.finfo(dtype).eps
    for name, ours, theirs, ref in zip(names, out + g, t_out + t_g, ref_out + ref_g):
        e_ours, e_torch = max_err(ours, ref), max_err(theirs, ref)
        floor = eps * ref.abs().max().item() if ref.numel() else 0.0
        assert e_ours <= 2 * e_torch + floor, (
            f"{name}: fastrnn error {e_ours:.3g} > 2 x the reference's {e_torch:.3g} + {floor:.3g}")


@needs_cuda_build
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("cell", LN_CELLS)
def test_ln_opcheck_cuda(cell, D):
    """fastrnn::ln_forward and ln_backward on CUDA tensors: the fake kernels' shapes and
    dtypes, autograd registration and schema (torch.library.opcheck)."""
    args = to_cuda(ln_op_args(cell, D, lengths=torch.tensor([3, 1])))
    torch.library.opcheck(ops.ln_forward, args)
    inference = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    torch.library.opcheck(ops.ln_forward, inference[:14] + (False,) + inference[15:])
    y, h_n, c_n, gates, hprev, cprev, ln_rstd = (o.detach() for o in ops.ln_forward(*args))
    (_, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths, reverse, _,
     _) = inference
    torch.library.opcheck(ops.ln_backward, (
        cell, torch.randn_like(y), torch.randn_like(h_n),
        torch.randn_like(c_n) if cell == "lstm" else None, gx, gx_w, gx_b, w_hh, b_hh, ln_w,
        ln_b, lnc_w, lnc_b, lengths, gates, hprev, cprev, ln_rstd, reverse))


@needs_cuda_build
@pytest.mark.parametrize("cell", LN_CELLS)
def test_ln_every_output_element_written(cell):
    """The caching allocator hands out NaN-poisoned memory; no NaN may survive in any output
    of fastrnn::ln_forward (saved tensors included) or ln_backward."""
    D, T, B, H = 2, 8, 5, 12
    args = to_cuda(ln_op_args(cell, D, T, B, H, lengths=lengths_for("mixed", T, B)))
    args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    extras = [v.to(DEV) for v in ln_extras(cell, D, T, B, H, "resets+zoneout+dropout", 1).values()]
    if cell == "gru":
        extras.insert(2, None)  # no zoneout_c
    for reverse in (False, True):
        fwd_args = args[:13] + (reverse,) + args[14:] + tuple(extras)
        poison()
        with torch.no_grad():
            fwd = ops.ln_forward(*fwd_args)
        for t in fwd:
            assert not t.isnan().any()
        y, h_n, c_n, gates, hprev, cprev, ln_rstd = fwd
        (_, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths) = args[:13]
        poison()
        with torch.no_grad():
            bwd = ops.ln_backward(cell, torch.randn_like(y), torch.randn_like(h_n),
                                  torch.randn_like(c_n) if cell == "lstm" else None, gx, gx_w,
                                  gx_b, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, lengths, gates,
                                  hprev, cprev, ln_rstd, reverse, *extras)
        for t in bwd:
            assert not t.isnan().any()


@needs_cuda_build
@pytest.mark.parametrize("cell", LN_CELLS)
def test_ln_gpu_lengths_need_no_host_sync(cell):
    """As for the plain cells: lengths on the GPU are read by the kernels, unchecked; neither
    the forward nor the backward of a LayerNorm layer waits for the device."""
    D, T, B, I, H = 2, 7, 5, 4, 8
    x, h0, c0, weights, _ = ln_inputs(cell, D, T, B, I, H)
    inp = ln_moved(x, h0, c0, weights)
    lens = lengths_for("mixed", T, B).to(DEV)
    cot = [w.to(DEV) for w in out_weights([torch.empty(T, B, D * H), torch.empty(D, B, H),
                                           torch.empty(D, B, H)])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rev in (False, True):
            ln_run(F.ln_layer, cell, *inp, lens, rev, cot=cot[:3 if cell == "lstm" else 2])
    finally:
        torch.cuda.set_sync_debug_mode(0)
