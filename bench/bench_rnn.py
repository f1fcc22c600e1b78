"""Benchmark fastrnn against torch.nn in the same process, interleaved.

For each case (cell, mode, shape) both modules get the same weights and the same
fresh random inputs; outputs are checked to agree once, then each repeat times
torch and fastrnn back to back (alternating which goes first) so that machine
noise hits both.  Reports median times, the ratio torch/fastrnn (>1: fastrnn is
faster), fastrnn's GFLOP/s and that rate as a fraction of a GEMM peak measured
in the same run.

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


def gemm_peak_gflops(n, dtype, device, repeats=5):
    """Median GFLOP/s of an n x n x n torch.mm: the practical limit on this machine."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    sync(device)
    t = statistics.median(time_once(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * n**3 / t / 1e9


class CheckError(AssertionError):
    pass


def make_case(cell, mode, B, T, I, H, num_layers=1, bidirectional=False, proj_size=0,
              dtype=torch.float32, device="cpu", seed=0):
    """Build both modules and their inputs; return (run_torch, run_fast, valid_steps).

    Each run_* does one timed unit of work and returns {name: tensor} with the
    outputs (plus the gradients in training modes) for the agreement check.
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

    def forward_torch():
        if lengths is None:
            return flat(ref(x))
        # What a user does with torch.nn today; the packing is part of the timed work.
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h = ref(packed)
        y, _ = pad_packed_sequence(out, total_length=T)
        return flat((y, h))

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
        d_inputs = torch.autograd.grad(list(outs.values()), [x] + params, grads)
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
            torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol * max(scale, 1.0))
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
        run_torch, run_fast, steps = make_case(cell, mode, B, T, I, H, args.num_layers, args.bidirectional,
                                               proj_size, dtype, device, seed=args.seed)
        check_agree(run_torch, run_fast, dtype, args.tol)
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


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per case; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each module before timing")
    p.add_argument("--peak-n", type=int, help="size of the square torch.mm for the GEMM peak "
                   "(default 2048 on CPU, 8192 on CUDA, where 2048 is too small to fill the GPU)")
    p.add_argument("--tol", type=float, help="agreement-check tolerance (default depends on dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(here, "results", "bench_rnn.json"), help="results file ('' to skip)")
    p.add_argument("--png", default=os.path.join(here, "results", "bench_rnn.png"), help="ratio chart ('' to skip)")
    args = p.parse_args(argv)

    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    shapes = args.shapes or GRIDS[args.grid]
    cases = [(c, m, s) for s in shapes for c in args.cells for m in args.modes]

    args.peak_n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    peak = gemm_peak_gflops(args.peak_n, dtype, device)
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable), sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
        cpu=cpu_model(), threads=torch.get_num_threads(), device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        dtype=args.dtype, torch=torch.__version__, python=platform.python_version(),
        fastrnn=fastrnn_version(), fastrnn_path=os.path.dirname(fastrnn.__file__),
        gemm_peak_gflops=peak, gemm_peak_n=args.peak_n, repeats=args.repeats, warmup=args.warmup,
        cpu_count=os.cpu_count(), loadavg_start=load_average(),
    )
    print(f"# {info['gpu'] or info['cpu']} | {info['threads']} threads | {args.dtype} on {device} | "
          f"torch {info['torch']} | fastrnn {info['fastrnn']} ({info['fastrnn_path']})")
    print(f"# GEMM peak ({args.peak_n}^3 torch.mm): {peak:.1f} GFLOP/s | median of {args.repeats}, "
          f"warm-up {args.warmup} | load average {info['loadavg_start']} | "
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
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, rows=rows), f, indent=1)
        print(f"# wrote {args.json}")
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        plot(rows, args.png, f"fastrnn vs torch.nn, {args.dtype} on {info['gpu'] or info['cpu']}, "
                             f"{info['threads']} threads, layers={args.num_layers}, bidir={args.bidirectional}")
        print(f"# wrote {args.png}")
    errors = [r for r in rows if "error" in r]
    if errors:
        print(f"error: {len(errors)} case(s) skipped, see the ERROR rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
