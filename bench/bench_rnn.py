"""Benchmark fastrnn against torch.nn in the same process, interleaved.

For each case (cell, mode, shape) both modules get the same weights and the same
fresh random inputs; outputs are checked to agree once, then each repeat times
torch and fastrnn back to back (alternating which goes first) so that machine
noise hits both.  Reports median times, the ratio torch/fastrnn (>1: fastrnn is
faster), fastrnn's GFLOP/s and that rate as a fraction of a GEMM peak measured
in the same run: the faster of torch.mm and oneDNN's matmul on a large square.

    python bench/bench_rnn.py                      # small default grid, ~1-2 min on 2 cores
    python bench/bench_rnn.py --grid issue --cells lstm --modes training
    python bench/bench_rnn.py --grid gpu --device cuda --dtype bfloat16
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn

CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
MODES = ("inference", "training", "varlen")
# Not in the default list: a second-order (gradient-penalty) training step.
EXTRA_MODES = ("penalty",)
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
# Loose on purpose: this only guards against benchmarking garbage; the test
# suite checks exactness.  Errors are measured relative to the output's scale.
CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-2, torch.bfloat16: 1e-1, torch.float16: 5e-2}

GRIDS = {
    # (B, T, I, H).  Small enough to finish in about 1-2 minutes on 2 CPU cores.
    "default": [(1, 100, 128, 128), (16, 100, 256, 256), (64, 100, 256, 256), (32, 200, 128, 128)],
    "issue": [(1, 100, 256, 256), (16, 100, 256, 256), (64, 100, 512, 512), (32, 500, 128, 128)],
    "gpu": [(B, T, H, H) for B in (1, 16, 64, 256) for T in (100, 1024) for H in (256, 512, 768, 1024)],
}


def rnn_flops(cell, steps, I, H, num_layers=1, bidirectional=False, proj_size=0, training=False):
    """Matmul FLOPs of one call (elementwise gate math is not counted).

    steps: number of valid (batch, time) pairs, i.e. B*T, or sum(lengths) for
    variable lengths (padded steps do no useful work).  Per valid step, per
    layer and direction, with G gates (LSTM 4, GRU 3, RNN 1) and Ho the hidden
    output size (proj_size if set, else H):
        input projection   2 * G*H * I_l      (I_l = I for layer 0, else D*Ho)
        recurrent GEMM     2 * G*H * Ho
        LSTM projection    2 * Ho * H         (only with proj_size)
    Training (forward + backward) counts 3x the forward: the backward does one
    GEMM for the input/hidden gradients and one for the weight gradients.
    """
    G, D = GATES[cell], 2 if bidirectional else 1
    Ho = proj_size or H
    total = 0
    for layer in range(num_layers):
        I_l = I if layer == 0 else D * Ho
        per_step = 2 * G * H * I_l + 2 * G * H * Ho + (2 * Ho * H if proj_size else 0)
        total += D * steps * per_step
    return 3 * total if training else total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device):
    """Seconds for one call: perf_counter on CPU, CUDA events (then synchronize) on GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_pair(fn_torch, fn_fast, repeats, warmup, device):
    """Seconds per call of fn_torch and fn_fast (two lists), timed interleaved.

    Each repeat runs both back to back, alternating which goes first, so slow
    phases of a noisy machine hit both alike.
    """
    for _ in range(warmup):
        fn_torch()
        fn_fast()
    sync(device)
    t_torch, t_fast = [], []
    for r in range(repeats):
        if r % 2 == 0:
            t_torch.append(time_once(fn_torch, device))
            t_fast.append(time_once(fn_fast, device))
        else:
            t_fast.append(time_once(fn_fast, device))
            t_torch.append(time_once(fn_torch, device))
    return t_torch, t_fast


def onednn_matmul(b, m):
    """A function a -> a @ b run by oneDNN's matmul, for a with m rows.

    b is packed once, here, as oneDNN packs a linear layer's weight
    (torch.ops.mkldnn._reorder_linear_weight), so the calls time the matmul
    alone.  Raises RuntimeError where oneDNN cannot run it (not on the CPU,
    torch built without mkldnn); a dtype it lacks (e.g. float64) raises here
    or on the first call.
    """
    if b.device.type != "cpu":
        raise RuntimeError(f"unavailable on {b.device.type}")
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("unavailable: torch built without mkldnn")
    w = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), m)
    return lambda a: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def try_onednn_matmul(a, b):
    """(a -> a @ b through oneDNN, None) after one successful call, or (None, why it is unavailable)."""
    try:
        fn = onednn_matmul(b, a.shape[0])
        fn(a)
        return fn, None
    except Exception as e:  # e.g. "itensor_view_from_dense expects float/bfloat16/half..." for float64
        if str(e).startswith("unavailable"):
            return None, str(e)
        return None, f"unavailable for {str(a.dtype).split('.')[-1]} ({type(e).__name__})"


def time_interleaved(fns, repeats, warmup, device):
    """Seconds per call of each function in the dict fns: {name: list of times}.

    Each repeat runs every function once, starting from a different one each
    time, so slow phases of a noisy machine hit all alike.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(time_once(fns[name], device))
    return times


def gemm_peak(n, dtype, device, repeats=5):
    """GFLOP/s (median of repeats) of an n x n x n GEMM by torch.mm and by oneDNN's matmul.

    torch.mm is MKL on x86 (in float32/float64), which takes a slow path on AMD
    CPUs; oneDNN's matmul does not, so the peak is the faster of the two.
    Returns a dict: mm, onednn (None where unavailable), onednn_note (why),
    peak and source ("torch.mm" or "oneDNN").
    """
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    onednn, note = try_onednn_matmul(a, b)
    fns = {"torch.mm": lambda: torch.mm(a, b)}
    if onednn is not None:
        fns["oneDNN"] = lambda: onednn(a)
    times = time_interleaved(fns, repeats, 1, device)
    rates = {name: 2 * n**3 / statistics.median(t) / 1e9 for name, t in times.items()}
    source = max(rates, key=rates.get)
    return dict(mm=rates["torch.mm"], onednn=rates.get("oneDNN"), onednn_note=note,
                peak=rates[source], source=source)


FMA_UNITS = 2  # FMA units per core: assumed (true of most recent x86 cores, not of all)


def fma_peak(cpuinfo, dtype, cores, max_mhz=None, clock_source=None):
    """Theoretical FMA peak in GFLOP/s from the text of /proc/cpuinfo, or None.

        cores x lanes x FMA_UNITS x 2 flops per FMA x clock

    lanes: the vector width in elements of dtype, from the flags (avx512f: 512
    bits, else avx2 and fma: 256 bits; neither, or a dtype other than
    float32/float64: None).  The clock is max_mhz where given, else the first
    "cpu MHz" line (the current clock, which may be below the maximum).
    Returns a dict with the GFLOP/s and every factor.
    """
    flags, mhz = set(), None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
    if "avx512f" in flags:
        isa, bits = "avx512f", 512
    elif {"avx2", "fma"} <= flags:
        isa, bits = "avx2+fma", 256
    else:
        return None
    if dtype not in (torch.float32, torch.float64):
        return None
    if max_mhz is None:
        if mhz is None:
            return None
        max_mhz, clock_source = mhz, '/proc/cpuinfo "cpu MHz": the current clock, not the maximum'
    lanes = bits // (32 if dtype == torch.float32 else 64)
    return dict(gflops=cores * lanes * FMA_UNITS * 2 * max_mhz / 1e3, cores=cores, isa=isa, lanes=lanes,
                fma_units=FMA_UNITS, fma_units_assumed=True, flops_per_fma=2, ghz=max_mhz / 1e3,
                clock_source=clock_source)


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def max_clock_mhz():
    """(MHz, source) of the CPU's maximum clock, from lscpu or cpufreq; (None, None) if neither says."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    for line in lscpu.splitlines():
        if line.startswith("CPU max MHz:"):
            return float(line.split(":", 1)[1]), 'lscpu "CPU max MHz"'
    khz = read_text("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    if khz:
        return int(khz) / 1e3, "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"
    return None, None


def theoretical_peak(dtype, device):
    """(fma_peak dict or None, one line describing it) for this machine, with torch's thread count as cores."""
    if device.type != "cpu":
        return None, f"n/a on {device.type}"
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return None, f"n/a on {platform.machine()} (derived for x86 only)"
    if dtype not in (torch.float32, torch.float64):
        return None, f"n/a for {str(dtype).split('.')[-1]} (derived for float32/float64 only)"
    theo = fma_peak(read_text("/proc/cpuinfo"), dtype, torch.get_num_threads(), *max_clock_mhz())
    if theo is None:
        return None, "n/a (no avx512f nor avx2+fma in /proc/cpuinfo flags, or no clock)"
    return theo, (f"{theo['gflops']:.1f} GFLOP/s = {theo['cores']} cores (threads) x {theo['lanes']} lanes "
                  f"({theo['isa']}) x {theo['fma_units']} FMA units (assumed) x 2 flops x {theo['ghz']:.2f} GHz "
                  f"({theo['clock_source']}); not the %peak denominator")


def measured_fma_peak(dtype, device, seconds=0.3):
    """(GFLOP/s or None, one line describing it): independent vector FMAs in registers on
    torch's thread count, with fastrnn's CPU kernels in use (fastrnn's _C.fma_peak).  The
    multiply-add limit at the clock the machine runs now: it counts the FMA pipes, a 512-bit
    FMA split in two halves and turbo clocks, which the derived figure has to assume."""
    if device.type != "cpu":
        return None, f"n/a on {device.type}"
    if dtype not in (torch.float32, torch.float64):
        return None, f"n/a for {str(dtype).split('.')[-1]} (float32/float64 only)"
    probe = getattr(fastrnn.ops._C, "fma_peak", None)
    if probe is None:
        return None, "n/a (this fastrnn build has no FMA probe)"
    threads = torch.get_num_threads()
    gflops = probe(dtype == torch.float64, threads, seconds)
    return gflops, (f"{gflops:.1f} GFLOP/s = independent {fastrnn.ops._C.cpu_kernels()} FMAs in registers "
                    f"on {threads} threads for {seconds:g} s (the multiply-add limit at the present clock; "
                    "not the %peak denominator)")


class CheckError(AssertionError):
    pass


def make_case(cell, mode, B, T, I, H, num_layers=1, bidirectional=False, proj_size=0,
              dtype=torch.float32, device="cpu", seed=0, autocast=None):
    """Build both modules and their inputs; return (run_torch, run_fast, valid_steps).

    Each run_* does one timed unit of work and returns {name: tensor} with the
    outputs (plus the gradients in training modes) for the agreement check. With
    ``autocast`` (a dtype), both forwards run under torch.autocast to it, as a user's
    mixed-precision training step does; the backward runs outside, as usual.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional)
    if proj_size and cell == "lstm":  # torch.nn supports proj_size on LSTM only
        kwargs["proj_size"] = proj_size
    else:
        proj_size = 0
    ref = getattr(torch.nn, CELLS[cell])(I, H, **kwargs).to(device, dtype)
    fast = getattr(fastrnn, CELLS[cell])(I, H, **kwargs).to(device, dtype)
    fast.load_state_dict(ref.state_dict())  # identical weights in both
    names = [name for name, _ in ref.named_parameters()]
    params_ref = [p for _, p in ref.named_parameters()]
    params_fast = [dict(fast.named_parameters())[name] for name in names]

    x = torch.randn(T, B, I, device=device, dtype=dtype)
    lengths = None
    if mode == "varlen":
        lengths = torch.randint(max(T // 4, 1), T + 1, (B,), generator=torch.Generator().manual_seed(seed))
        lengths_dev = lengths.to(device)
    steps = int(lengths.sum()) if lengths is not None else B * T

    # Fixed random output gradients: the same backward work for both modules.
    training = mode != "inference"
    if training:
        x.requires_grad_(True)  # as when the RNN sits on top of an embedding or another layer
        D, Ho = 2 if bidirectional else 1, proj_size or H
        grads = [torch.randn(T, B, D * Ho, device=device, dtype=dtype),
                 torch.randn(D * num_layers, B, Ho, device=device, dtype=dtype)]
        if cell == "lstm":
            grads.append(torch.randn(D * num_layers, B, H, device=device, dtype=dtype))

    def flat(out):
        y, h = out
        return dict(zip(("output", "h_n", "c_n"), (y, *h) if isinstance(h, tuple) else (y, h)))

    def mixed(forward):
        if autocast is None:
            return forward
        return torch.autocast(device.type, dtype=autocast)(forward)

    @mixed
    def forward_torch():
        if lengths is None:
            return flat(ref(x))
        # What a user does with torch.nn today; the packing is part of the timed work.
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h = ref(packed)
        y, _ = pad_packed_sequence(out, total_length=T)
        return flat((y, h))

    @mixed
    def forward_fast():
        return flat(fast(x) if lengths is None else fast(x, lengths=lengths_dev))

    def run(forward, params):
        if not training:
            with torch.inference_mode():
                return forward()
        outs = forward()
        if mode == "penalty":  # loss = |d(outputs . grads)/dx|^2, as in WGAN-GP or R1
            gx, = torch.autograd.grad(list(outs.values()), [x], grads, create_graph=True)
            d_inputs = torch.autograd.grad(gx.pow(2).sum(), [x] + params)
            return {**outs, "input gradient": gx,
                    **{f"grad {name}": g for name, g in zip(["input"] + names, d_inputs)}}
        d_inputs = torch.autograd.grad(list(outs.values()), [x] + params,
                                       [g.to(o.dtype) for g, o in zip(grads, outs.values())])
        return {**outs, **{f"grad {name}": g for name, g in zip(["input"] + names, d_inputs)}}

    return (lambda: run(forward_torch, params_ref)), (lambda: run(forward_fast, params_fast)), steps


def check_agree(run_torch, run_fast, dtype, tol=None):
    """Raise CheckError unless every output (and gradient) of fastrnn matches torch."""
    tol = CHECK_TOL[dtype] if tol is None else tol
    fast, ref = run_fast(), run_torch()
    for name, b in ref.items():
        a = fast[name]
        scale = b.detach().abs().max().item() if b.numel() else 0.0
        try:
            # In float64: under autocast torch.nn returns float32 or the autocast dtype,
            # depending on the module.
            torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=tol,
                                       atol=tol * max(scale, 1.0))
        except AssertionError as e:
            detail = "; ".join(line.strip() for line in str(e).splitlines()[:4] if line.strip())
            raise CheckError(f"fastrnn disagrees with torch.nn on {name} "
                             f"(shape {tuple(b.shape)}): {detail}") from None


def run_case(case, args, dtype, device, peak):
    """Check agreement, time both, and return one result row (dict)."""
    cell, mode, (B, T, I, H) = case
    proj_size = args.proj_size if cell == "lstm" else 0
    row = dict(cell=cell, mode=mode, B=B, T=T, I=I, H=H, layers=args.num_layers,
               bidir=args.bidirectional, proj_size=proj_size)
    try:
        autocast = DTYPES[args.autocast] if args.autocast else None
        run_torch, run_fast, steps = make_case(cell, mode, B, T, I, H, args.num_layers, args.bidirectional,
                                               proj_size, dtype, device, seed=args.seed,
                                               autocast=autocast)
        check_agree(run_torch, run_fast, autocast or dtype, args.tol)
    except Exception as e:  # a mismatch, or e.g. a dtype fastrnn does not support: skip, but say why
        row["error"] = str(e) if isinstance(e, CheckError) else f"{type(e).__name__}: {e}"
        return row
    times_torch, times_fast = time_pair(run_torch, run_fast, args.repeats, args.warmup, torch.device(device))
    t_torch, t_fast = statistics.median(times_torch), statistics.median(times_fast)
    flops = rnn_flops(cell, steps, I, H, args.num_layers, args.bidirectional, proj_size,
                      training=mode != "inference")
    row.update(valid_steps=steps, gflop=flops / 1e9, torch_ms=t_torch * 1e3, fastrnn_ms=t_fast * 1e3,
               ratio=t_torch / t_fast, fastrnn_gflops=flops / t_fast / 1e9,
               torch_gflops=flops / t_torch / 1e9,
               torch_ms_all=[t * 1e3 for t in times_torch], fastrnn_ms_all=[t * 1e3 for t in times_fast])
    row["pct_peak"] = 100 * row["fastrnn_gflops"] / peak
    return row


COLUMNS = [  # (header, width, format of the row value)
    ("cell", 5, lambda r: r["cell"]), ("mode", 9, lambda r: r["mode"]),
    ("B", 4, lambda r: r["B"]), ("T", 5, lambda r: r["T"]), ("I", 5, lambda r: r["I"]),
    ("H", 5, lambda r: r["H"]), ("layers", 6, lambda r: r["layers"]),
    ("bidir", 5, lambda r: "yes" if r["bidir"] else "no"),
    ("torch ms", 10, lambda r: f"{r['torch_ms']:.3f}"), ("fastrnn ms", 10, lambda r: f"{r['fastrnn_ms']:.3f}"),
    ("ratio", 6, lambda r: f"{r['ratio']:.2f}"), ("GFLOP/s", 8, lambda r: f"{r['fastrnn_gflops']:.1f}"),
    ("%peak", 6, lambda r: f"{r['pct_peak']:.1f}"),
]


def format_row(row):
    if "error" in row:
        head = "  ".join(str(fn(row)).rjust(w) for _, w, fn in COLUMNS[:8])
        return f"{head}  ERROR: {row['error']}"
    return "  ".join(str(fn(row)).rjust(w) for _, w, fn in COLUMNS)


def add_cpu_options(p):
    """--threads and --cpu-kernels, shared by the bench scripts."""
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--cpu-kernels", help="fastrnn's CPU instruction set: avx512, avx2 or portable "
                   "(default: the best this CPU supports); measures another CPU's code path here")
    p.add_argument("--cpu-amx", choices=["on", "off"], default="on",
                   help="off: fastrnn's bf16 recurrent step does not use AMX tiles even where the "
                   "CPU has them (compares the step without them on the same CPU)")


def apply_cpu_options(p, args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_kernels and not fastrnn.ops._C.set_cpu_kernels(args.cpu_kernels):
        p.error(f"--cpu-kernels {args.cpu_kernels}: this CPU runs only "
                f"{', '.join(fastrnn.ops._C.supported_cpu_kernels())}")
    fastrnn.ops._C.allow_amx(args.cpu_amx == "on")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(info):
    """The CPU model, and the GPU's name when running on CUDA."""
    return f"{info['gpu']} (host CPU: {info['cpu']})" if info["gpu"] else info["cpu"]


def load_average():
    """1-minute load average, or None where the OS does not provide one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def fastrnn_version():
    if hasattr(fastrnn, "__version__"):
        return fastrnn.__version__
    try:
        return importlib.metadata.version("fastrnn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "ratio" in r]
    colors = {"inference": "tab:blue", "training": "tab:orange", "varlen": "tab:green",
              "penalty": "tab:red"}
    labels = [f"{r['cell']} {r['mode']}\nB{r['B']} T{r['T']} I{r['I']} H{r['H']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(rows) + 2), 5))
    # Bars grow from 1.0: up where fastrnn is faster, down where it is slower.
    bars = ax.bar(range(len(rows)), [r["ratio"] - 1 for r in rows], bottom=1,
                  color=[colors[r["mode"]] for r in rows])
    ax.bar_label(bars, [f"{r['ratio']:.2f}" for r in rows], fontsize=6, rotation=90, padding=2)
    ax.set_yscale("log")  # 2x faster and 2x slower sit at the same distance from 1.0
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.margins(y=0.15)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("torch.nn time / fastrnn time  (>1: fastrnn faster)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_shapes(text):
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in text.split(";") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected 'B,T,I,H;B,T,I,H;...', got {text!r}")
    return shapes


def parse_list(choices):
    def parse(text):
        items = [s.strip().lower() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return items
    return parse


def save_json(path, info, rows):
    """Write the machine info and every row to `path` ('' or None: nothing)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(machine=info, rows=rows), f, indent=1)
    print(f"# wrote {path}")


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=parse_list(tuple(CELLS)), default=list(CELLS), help="comma list of lstm,gru,rnn")
    p.add_argument("--modes", type=parse_list(MODES + EXTRA_MODES), default=list(MODES),
                   help="comma list of inference,training,varlen (varlen = training with lengths in "
                   "[T/4, T]) and penalty (second order: a gradient penalty on the input gradient)")
    p.add_argument("--grid", choices=tuple(GRIDS), default="default", help="preset list of (B,T,I,H) shapes")
    p.add_argument("--shapes", type=parse_shapes, help="'B,T,I,H;B,T,I,H' (overrides --grid)")
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--proj-size", type=int, default=0, help="LSTM proj_size (other cells ignore it)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--autocast", choices=("bfloat16", "float16"),
                   help="run both forwards under torch.autocast to this dtype (mixed precision; "
                        "the models stay in --dtype)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--cuda-persistent", action="store_true",
                   help="CUDA: fastrnn tries its persistent kernels first (W_hh on chip for "
                        "the whole sequence; layers it does not fit run the per-step path)")
    p.add_argument("--tf32", choices=("off", "on"), default="off",
                   help="CUDA float32: TF32 tensor cores for both sides (torch.backends.cuda.matmul"
                        ".allow_tf32 for fastrnn's GEMMs, torch.backends.cudnn.allow_tf32 for cuDNN's)"
                        "; off (default) is exact FP32 on both")
    add_cpu_options(p)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per case; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each module before timing")
    p.add_argument("--peak-n", type=int, help="size of the square GEMM (torch.mm and oneDNN) for the peak "
                   "(default 2048 on CPU, 8192 on CUDA, where 2048 is too small to fill the GPU)")
    p.add_argument("--tol", type=float, help="agreement-check tolerance (default depends on dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(here, "results", "bench_rnn.json"), help="results file ('' to skip)")
    p.add_argument("--png", default=os.path.join(here, "results", "bench_rnn.png"), help="ratio chart ('' to skip)")
    args = p.parse_args(argv)

    from tqdm import tqdm

    apply_cpu_options(p, args)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    if args.cuda_persistent:
        if not getattr(fastrnn.ops._C, "cuda", False):
            p.error("--cuda-persistent: fastrnn was built without its CUDA kernels")
        fastrnn.ops._C.set_cuda_persistent(True)
    shapes = args.shapes or GRIDS[args.grid]
    cases = [(c, m, s) for s in shapes for c in args.cells for m in args.modes]

    args.peak_n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    gemm = gemm_peak(args.peak_n, dtype, device)
    peak = gemm["peak"]
    theo, theo_line = theoretical_peak(dtype, device)
    fma_gflops, fma_line = measured_fma_peak(dtype, device)
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable), sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
        cpu=cpu_model(), threads=torch.get_num_threads(), device=str(device),
        cpu_kernels=fastrnn.ops._C.cpu_kernels(), cpu_amx=fastrnn.ops._C.bf16_step_amx(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        dtype=args.dtype, autocast=args.autocast, torch=torch.__version__, python=platform.python_version(),
        fastrnn=fastrnn_version(), fastrnn_path=os.path.dirname(fastrnn.__file__),
        gemm_mm_gflops=gemm["mm"], gemm_onednn_gflops=gemm["onednn"], gemm_onednn_note=gemm["onednn_note"],
        gemm_peak_gflops=peak, gemm_peak_source=gemm["source"], gemm_peak_n=args.peak_n,
        theoretical_peak_gflops=theo["gflops"] if theo else None, theoretical_peak=theo,
        theoretical_peak_text=theo_line, measured_fma_peak_gflops=fma_gflops, measured_fma_peak_text=fma_line,
        repeats=args.repeats, warmup=args.warmup, cpu_count=os.cpu_count(), loadavg_start=load_average(),
    )
    onednn_text = f"{gemm['onednn']:.1f}" if gemm["onednn"] is not None else gemm["onednn_note"]
    precision = args.dtype + (f" under autocast to {args.autocast}" if args.autocast else "")
    if device.type == "cuda" and args.dtype == "float32" and not args.autocast:
        precision += f" (TF32 {args.tf32} on both sides)"
    if args.cuda_persistent:
        precision += ", fastrnn's persistent CUDA kernels"
    print(f"# {machine_name(info)} | {info['threads']} threads | {precision} on {device} | "
          f"torch {info['torch']} | fastrnn {info['fastrnn']} ({info['fastrnn_path']}), "
          f"CPU kernels {info['cpu_kernels']}{' + AMX' if info['cpu_amx'] else ''}")
    print(f"# GEMM {args.peak_n}^3 GFLOP/s: torch.mm {gemm['mm']:.1f}, oneDNN matmul {onednn_text} | "
          f"peak = {gemm['source']} {peak:.1f} GFLOP/s (the %peak denominator)")
    print(f"# measured FMA peak: {fma_line}")
    print(f"# theoretical FMA peak: {theo_line}")
    print(f"# median of {args.repeats}, warm-up {args.warmup} | load average {info['loadavg_start']} | "
          f"ratio = torch ms / fastrnn ms (>1: fastrnn faster)")
    # Other processes competing for the cores distort timings far more than run-to-run noise.
    if info["loadavg_start"] and info["loadavg_start"] > (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {info['loadavg_start']} on {os.cpu_count()} CPUs); "
              "timings will be noisy", file=sys.stderr)
    print("  ".join(h.rjust(w) for h, w, _ in COLUMNS))

    rows = []
    # The bar goes to stderr, only on a terminal, and only on runs longer than a couple of seconds.
    for case in tqdm(cases, file=sys.stderr, disable=None, delay=2, leave=False, desc="bench"):
        row = run_case(case, args, dtype, device, peak)
        rows.append(row)
        tqdm.write(format_row(row), file=sys.stdout)
        sys.stdout.flush()

    info["loadavg_end"] = load_average()
    save_json(args.json, info, rows)
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        plot(rows, args.png, f"fastrnn vs torch.nn, {args.dtype}, {info['threads']} threads, "
                             f"layers={args.num_layers}, bidir={args.bidirectional}\n{machine_name(info)}")
        print(f"# wrote {args.png}")
    errors = [r for r in rows if "error" in r]
    if errors:
        print(f"error: {len(errors)} case(s) skipped, see the ERROR rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
