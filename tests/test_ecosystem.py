"""fastrnn inside the rest of PyTorch: torch.compile, autocast, DDP, determinism,
threads and memory.

Guarantees checked here (CPU):
- torch.compile(fullgraph=True) traces models with fastrnn modules in one graph, with
  lengths= too, matches eager forward and backward, and does not recompile per shape.
- Under CPU autocast the recurrence runs in float32 and y, h_n, c_n come back in the
  autocast dtype (as torch.nn.LSTM's do); float64 models are left alone.
- Same seed: bitwise-identical outputs and gradients, dropout included, for any thread
  count, with no environment variable (every GEMM is fastrnn's own, with a fixed
  summation order).
"""
import copy
import gc
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastrnn

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
F64 = {"atol": 1e-9, "rtol": 1e-7}
KINDS = ["LSTM", "GRU", "RNN"]
VOCAB, EMB, HID, OUT = 50, 8, 16, 5


class Tagger(nn.Module):
    """Embedding -> bidirectional 2-layer recurrent layer -> linear, per step."""

    def __init__(self, kind="LSTM", dropout=0.0, **kwargs):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.rnn = getattr(fastrnn, kind)(EMB, HID, num_layers=2, bidirectional=True,
                                          dropout=dropout, **kwargs)
        self.head = nn.Linear(2 * HID, OUT)

    def forward(self, tokens, lengths=None):
        y, _ = self.rnn(self.emb(tokens), lengths=lengths)
        return self.head(y)


def tokens_and_lengths(T, B, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (T, B), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return tokens.to(device), lengths.to(device)


def grads(model):
    # A compiled module names its parameters "_orig_mod.<name>".
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def run_step(model, *args):
    """Forward, then backward of a fixed linear function of the output."""
    model.zero_grad(set_to_none=True)
    out = model(*args)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    (out.reshape(-1) * w).sum().backward()
    return out.detach(), grads(model)


# --------------------------------------------------------------------------- torch.compile

SHAPES = [(5, 3), (7, 4), (9, 2), (6, 5)]  # (T, B): four different shapes


def check_compiled(kind, device, use_lengths, backend="inductor"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tagger(kind).to(device)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for T, B in SHAPES:
        tokens, lengths = tokens_and_lengths(T, B, device)
        args = (tokens, lengths) if use_lengths else (tokens,)
        out_ref, g_ref = run_step(model, *args)
        out, g = run_step(compiled, *args)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(g, g_ref)
    # The first shape compiles static, the second one dynamic; the rest reuse it.
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for {len(SHAPES)} shapes"


@pytest.mark.parametrize("use_lengths", [False, True], ids=["padded", "lengths"])
def test_compile_fullgraph_lstm_inductor(use_lengths):
    check_compiled("LSTM", "cpu", use_lengths)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_compile_fullgraph_gru_rnn(kind):
    # Same tracing path as the LSTM; aot_eager keeps the test quick.
    check_compiled(kind, "cpu", use_lengths=True, backend="aot_eager")


@CUDA
@pytest.mark.parametrize("use_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_cuda(kind, use_lengths):
    check_compiled(kind, "cuda", use_lengths)


def test_compile_no_graph_break_where_torch_nn_breaks():
    """Dynamo does not trace torch.nn's RNN modules (a graph break, an error under
    fullgraph); the same model with fastrnn modules is one graph."""
    torch._dynamo.reset()
    model = Tagger("LSTM")
    tokens, lengths = tokens_and_lengths(6, 3)
    explained = torch._dynamo.explain(model)(tokens, lengths)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    reference = fastrnn.to_torch(copy.deepcopy(model))
    assert isinstance(reference.rnn, nn.LSTM)
    def reference_forward(tokens):
        return reference.head(reference.rnn(reference.emb(tokens))[0])

    if torch._dynamo.explain(reference_forward)(tokens).graph_break_count == 0:
        pytest.skip("this torch traces torch.nn.LSTM without a graph break")


def test_compile_packed_sequence():
    """PackedSequence input works under torch.compile but is not one graph: packing
    is data-dependent and torch's pack/pad functions are not traced. Use lengths= for
    fullgraph."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch._dynamo.reset()
    torch.manual_seed(0)
    rnn = fastrnn.LSTM(4, 6, bidirectional=True)

    def f(x, lengths):
        out, (h, c) = rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(out)[0], h, c

    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 4])
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(x, lengths), f(x, lengths))


# --------------------------------------------------------------------------- autocast

def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_cpu_bfloat16(kind):
    """Runs in float32, returns bfloat16: at least as accurate as torch.nn's own
    autocast result (oneDNN's bfloat16 LSTM) against a float64 reference."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(6, 8, num_layers=2, bidirectional=True)
    fast = getattr(fastrnn, kind)(6, 8, num_layers=2, bidirectional=True)
    fast.load_state_dict(ref.state_dict())
    exact = copy.deepcopy(ref).double()
    x = torch.randn(7, 3, 6)
    y64, h64 = exact(x.double())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = fast(x)
        y_ref, h_ref = ref(x)
    states = h if kind == "LSTM" else (h,)
    assert y.dtype == torch.bfloat16
    assert all(s.dtype == torch.bfloat16 for s in states)
    if kind != "GRU":  # torch.nn.GRU happens to return float32 here (see the README)
        assert y_ref.dtype == y.dtype
    assert max_err(y, y64) <= 2 * max_err(y_ref, y64) + 1e-3

    # Gradients reach the float32 parameters in float32, close to the float32 ones.
    y.float().sum().backward()
    g = grads(fast)
    fast.zero_grad()
    fast(x)[0].sum().backward()
    for name, g32 in grads(fast).items():
        assert g[name].dtype == torch.float32
        torch.testing.assert_close(g[name], g32, atol=2e-2 * g32.abs().max().item(), rtol=0)


def test_autocast_cpu_float16_and_cells():
    # torch.nn.LSTM fails under CPU float16 autocast (oneDNN has no such primitive).
    torch.manual_seed(0)
    lstm = fastrnn.LSTM(4, 6, proj_size=3)
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        y, (h, c) = lstm(x)
    assert (y.dtype, h.dtype, c.dtype) == (torch.float16,) * 3
    torch.testing.assert_close(y.float(), lstm(x)[0], atol=2e-3, rtol=2e-3)

    for cell in (fastrnn.LSTMCell(4, 6), fastrnn.GRUCell(4, 6), fastrnn.RNNCell(4, 6)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = cell(x[0])
        for t in out if isinstance(out, tuple) else (out,):
            assert t.dtype == torch.bfloat16


def test_autocast_cpu_leaves_float64_alone():
    torch.manual_seed(0)
    lstm = fastrnn.LSTM(4, 6, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = lstm(x)
    assert y.dtype == h.dtype == c.dtype == torch.float64
    assert torch.equal(y, lstm(x)[0])


def test_autocast_cpu_compiled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tagger("LSTM")
    tokens, lengths = tokens_and_lengths(6, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, _ = model.rnn(model.emb(tokens), lengths=lengths)
        out_eager, g_eager = run_step(model, tokens, lengths)
        out, g = run_step(compiled, tokens, lengths)
    assert y_eager.dtype == torch.bfloat16
    assert out.dtype == out_eager.dtype
    torch.testing.assert_close(out, out_eager)
    for name, want in g_eager.items():  # bfloat16 rounding may land differently
        torch.testing.assert_close(g[name], want, atol=1e-2 * want.abs().max().item(), rtol=0)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_cuda(kind, dtype):
    """Results in the autocast dtype, as torch.nn's RNNs give them, error within 2x theirs.

    torch.nn's cuDNN path casts to float16 under any CUDA autocast (bfloat16 included: seen
    with torch 2.11 on an H100), so under bfloat16 the reference is torch.nn's own non-cuDNN
    path, which autocasts each step's matmuls to bfloat16. fastrnn keeps the dtype asked for.
    """
    torch.manual_seed(0)
    ref = getattr(nn, kind)(6, 8, num_layers=2, bidirectional=True).cuda()
    fast = getattr(fastrnn, kind)(6, 8, num_layers=2, bidirectional=True).cuda()
    fast.load_state_dict(ref.state_dict())
    exact = copy.deepcopy(ref).double()
    x = torch.randn(7, 3, 6, device="cuda")
    y64, _ = exact(x.double())
    with torch.autocast("cuda", dtype=dtype):
        y, h = fast(x)
        with torch.backends.cudnn.flags(enabled=dtype == torch.float16):
            y_ref, h_ref = ref(x)
    assert y.dtype == y_ref.dtype == dtype
    for s, s_ref in zip(h if kind == "LSTM" else (h,), h_ref if kind == "LSTM" else (h_ref,)):
        assert s.dtype == s_ref.dtype
    assert max_err(y, y64) <= 2 * max_err(y_ref, y64) + 1e-3
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())


# --------------------------------------------------------------------------- DDP

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_STEPS, DDP_BATCH, DDP_T = 4, 8, 6


def ddp_model():
    torch.manual_seed(0)
    return Tagger("LSTM").double()


def ddp_data(step):
    tokens, lengths = tokens_and_lengths(DDP_T, DDP_BATCH, seed=100 + step)
    target = torch.randn(DDP_T, DDP_BATCH, OUT, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(step))
    return tokens, lengths, target


def train(model, rows=slice(None)):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(DDP_STEPS):
        tokens, lengths, target = ddp_data(step)
        out = model(tokens[:, rows], lengths[rows])
        # Mean over this process's rows: DDP averages it into the full-batch mean.
        loss = (out - target[:, rows]).square().sum((0, 2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):  # keep gloo on the loopback interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model = ddp_model()
        if rank == 1:  # DDP broadcasts rank 0's parameters at construction
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        share = DDP_BATCH // world
        train(DistributedDataParallel(model), slice(rank * share, (rank + 1) * share))
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_matches_single_process():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(ddp_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    single = ddp_model()
    start = copy.deepcopy(single.state_dict())
    train(single)
    for name, p in single.state_dict().items():
        assert not torch.equal(p, start[name]), f"{name} did not train"
        for state in states:
            torch.testing.assert_close(state[name], p, **F64, msg=name)


# --------------------------------------------------------------------------- determinism

def seeded_run(kind, dtype=torch.float32, T=12, B=6, hidden=HID, dropout_seed=None):
    torch.manual_seed(1234)
    model = getattr(fastrnn, kind)(EMB, hidden, num_layers=3, bidirectional=True,
                                   dropout=0.3, dtype=dtype)
    x = torch.randn(T, B, EMB, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    if dropout_seed is not None:  # same weights and data, other dropout masks
        torch.manual_seed(dropout_seed)
    y, h = model(x, lengths=lengths)
    states = h if kind == "LSTM" else (h,)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum()
    loss = loss + sum(s.square().sum() for s in states)
    loss.backward()
    return [y, *states, x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_is_bitwise_reproducible(kind):
    first, second = seeded_run(kind), seeded_run(kind)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # Dropout is on: other masks give another result.
    assert not torch.equal(first[0], seeded_run(kind, dropout_seed=99)[0])


def run_script(code, env=None, timeout=120):
    """Run `code` in a fresh Python; env entries set to None are removed."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("plan", ["hidden_split", "row_split"])
def test_bitwise_across_thread_counts(plan):
    """1 and 2 threads give bitwise the same outputs and gradients, float32 and float64,
    with no environment variable: every GEMM (the recurrent step and the large ones) splits
    only rows and columns over threads, never a sum, so each value is summed in one fixed
    order. B=3 makes the recurrence split its hidden units over the 2 threads; B=32 gives
    each thread its own rows."""
    B = 3 if plan == "hidden_split" else 32
    out = run_script(f"""
        import sys
        import torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_ecosystem import seeded_run
        for kind in ("LSTM", "GRU", "RNN"):
            for dtype in (torch.float32, torch.float64):
                torch.set_num_threads(1)
                one = seeded_run(kind, dtype, T=40, B={B}, hidden=128)
                torch.set_num_threads(2)
                two = seeded_run(kind, dtype, T=40, B={B}, hidden=128)
                bad = [i for i, (a, b) in enumerate(zip(one, two)) if not torch.equal(a, b)]
                print(kind, dtype, "differs at", bad if bad else "none")
    """, env={"MKL_CBWR": None})
    assert out.count("differs at none") == 6, out


# --------------------------------------------------------------------------- threads

def test_concurrent_python_threads():
    """Separate models run forward+backward in several Python threads at once and get
    what they get alone."""
    models, inputs = [], []
    torch.manual_seed(0)
    for kind, kwargs in [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}),
                         ("LSTM", {"proj_size": 8})]:
        models.append(getattr(fastrnn, kind)(EMB, 32, num_layers=2, bidirectional=True,
                                             dtype=torch.float64, **kwargs))
        T, B = 10, 16
        lengths = torch.randint(1, T + 1, (B,))
        inputs.append((torch.randn(T, B, EMB, dtype=torch.float64), lengths))

    def work(i):
        model, (x, lengths) = models[i], inputs[i]
        x = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        y, _ = model(x, lengths=lengths)
        (y * y).sum().backward()
        return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]

    expected = [work(i) for i in range(len(models))]
    results, errors = {}, []

    def thread_main(i):
        try:
            for _ in range(5):
                results[i] = work(i)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, want in enumerate(expected):
        for got, ref in zip(results[i], want):
            torch.testing.assert_close(got, ref, **F64)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_set_num_threads_is_honoured():
    """With torch.set_num_threads(1) the kernels start no thread of their own, at a size
    where they would use two (and both directions run at once with two); results match
    those with two threads."""
    out = run_script("""
        import os
        import torch, fastrnn
        torch.set_num_threads(1)
        torch.manual_seed(0)
        lstm = fastrnn.LSTM(32, 256, bidirectional=True)
        x = torch.randn(10, 64, 32, requires_grad=True)
        # torch's own threads first: a CUDA build's autograd engine starts one per device
        # at its first backward.
        torch.ones(1, requires_grad=True).sum().backward()
        tasks = len(os.listdir("/proc/self/task"))
        y1, _ = lstm(x)
        y1.sum().backward()
        print("new threads", len(os.listdir("/proc/self/task")) - tasks)
        torch.set_num_threads(2)
        with torch.no_grad():
            y2, _ = lstm(x)
        torch.testing.assert_close(y1, y2)
    """)
    assert "new threads 0" in out, out


# --------------------------------------------------------------------------- memory

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_memory_growth_over_1000_steps():
    """Training steps (forward, backward, optimizer) leave resident memory flat, on one
    thread and with both directions running on their own threads."""
    torch.manual_seed(0)
    lstm, head = fastrnn.LSTM(EMB, HID, bidirectional=True), nn.Linear(2 * HID, 1)
    opt = torch.optim.SGD([*lstm.parameters(), *head.parameters()], lr=0.01)
    x = torch.randn(10, 4, EMB)
    _, lengths = tokens_and_lengths(10, 4)

    def step(i):
        y, _ = lstm(x, lengths=lengths if i % 2 else None)
        loss = head(y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    threads = torch.get_num_threads()
    try:
        # The 2-thread run is shorter: on a loaded machine its thread handoffs dominate.
        for num_threads, warm_up, steps in [(1, 500, 1000), (2, 100, 300)]:
            torch.set_num_threads(num_threads)
            for i in range(warm_up):  # allocator pools and caches settle within ~500 steps
                step(i)
            gc.collect()
            before = rss_bytes()
            for i in range(steps):
                step(i)
            gc.collect()
            growth = rss_bytes() - before
            # A leaked activation or packed weight per step is >= 5 KB here, i.e. >= 1.4 MiB
            # over 300 steps; allow 1 MiB of allocator settling (a few KiB seen).
            assert growth < 2**20, (
                f"{num_threads} thread(s): resident memory grew by {growth / 2**20:.2f} MiB "
                f"over {steps} steps")
    finally:
        torch.set_num_threads(threads)
