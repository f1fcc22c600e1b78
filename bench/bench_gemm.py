"""GFLOP/s of the GEMMs an RNN layer runs on the CPU: torch.mm, oneDNN's matmul, fastrnn's own.

For each cell and (B, T, I, H), with G gates (LSTM 4, GRU 3, RNN 1), a @ b for

    input projection  [T*B, I]   x [I, G*H]
    dx                [T*B, G*H] x [G*H, I]
    weight gradient   [G*H, T*B] x [T*B, I]    a = dgx.t(), a transposed view, as in the backward
    recurrent step    [B, H]     x [H, G*H]

plus one square --square^3.  Implementations: torch.mm (MKL on x86), oneDNN's
matmul with b packed once beforehand (as bench_rnn.py's GEMM peak), and
torch.ops.fastrnn.mm where the installed build has it ("n/a" otherwise).
Each rate is the median of --repeats, timed interleaved, and is also shown as a
percentage of the faster of torch.mm and oneDNN on that shape.

    python bench/bench_gemm.py
    python bench/bench_gemm.py --cells lstm,gru --shapes "64,100,512,512" --dtype float64
"""
import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rnn import (CELLS, CHECK_TOL, DTYPES, GATES, cpu_model, load_average,  # noqa: E402
                       parse_list, parse_shapes, save_json, time_interleaved, try_onednn_matmul)

IMPLS = ("torch.mm", "oneDNN", "fastrnn")
CPU = torch.device("cpu")


def fastrnn_mm():
    """torch.ops.fastrnn.mm (a @ b) if the installed fastrnn has it, else None."""
    try:
        import fastrnn  # noqa: F401  (registers torch.ops.fastrnn)
        return torch.ops.fastrnn.mm if hasattr(torch.ops.fastrnn, "mm") else None
    except Exception:
        return None


def layer_gemms(cell, B, T, I, H, dtype):
    """[(name, a, b)]: random operands of each GEMM one layer of cell runs."""
    G = GATES[cell]

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype)

    return [
        ("input proj", rand(T * B, I), rand(I, G * H)),
        ("dx", rand(T * B, G * H), rand(G * H, I)),
        ("weight grad", rand(T * B, G * H).t(), rand(T * B, I)),
        ("recurrent", rand(B, H), rand(H, G * H)),
    ]


def agrees(out, ref):
    """Whether out matches ref, to bench_rnn.py's tolerance relative to ref's scale."""
    tol = CHECK_TOL[ref.dtype]
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return out.shape == ref.shape and torch.allclose(out, ref, rtol=tol, atol=tol * max(scale, 1.0))


def bench_one(a, b, repeats, fast_mm):
    """Time a @ b with each implementation; return (GFLOP/s by impl or None, raw ms, notes by impl).

    An implementation that cannot run this case gets a note and no rate; one
    whose result disagrees with torch.mm gets the note "WRONG: ...".
    """
    (M, K), N = a.shape, b.shape[1]
    ref = torch.mm(a, b)
    fns, notes = {"torch.mm": lambda: torch.mm(a, b)}, {}
    onednn, note = try_onednn_matmul(a, b)
    if onednn is None:
        notes["oneDNN"] = note
    else:
        fns["oneDNN"] = lambda: onednn(a)
    if fast_mm is None:
        notes["fastrnn"] = "torch.ops.fastrnn.mm is not in this build"
    else:
        try:
            fast_mm(a, b)
            fns["fastrnn"] = lambda: fast_mm(a, b)
        except Exception as e:  # e.g. a dtype or a layout it does not take
            notes["fastrnn"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    for name in ("oneDNN", "fastrnn"):
        if name in fns and not agrees(fns[name](), ref):
            del fns[name]
            notes[name] = "WRONG: result disagrees with torch.mm"

    times = time_interleaved(fns, repeats, 1, CPU)
    gflops = {name: 2 * M * N * K / statistics.median(t) / 1e9 for name, t in times.items()}
    ms = {name: [x * 1e3 for x in t] for name, t in times.items()}
    return gflops, ms, notes


def l2_read_gbps(kib=512, repeats=2000):
    """One core's read bandwidth from a buffer of `kib` KiB (L2-resident on most x86 CPUs):
    what bounds a batch-1 recurrent step, which streams its slice of W_hh every step."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.ones(kib * 256)
        for _ in range(100):
            a.sum()
        t = time.perf_counter()
        for _ in range(repeats):
            a.sum()
        return a.numel() * 4 * repeats / (time.perf_counter() - t) / 1e9
    finally:
        torch.set_num_threads(saved)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=parse_list(tuple(CELLS)), default=["lstm"], help="comma list of lstm,gru,rnn")
    p.add_argument("--shapes", type=parse_shapes, default=[(16, 100, 256, 256), (64, 100, 512, 512)],
                   help="'B,T,I,H;B,T,I,H' (default '16,100,256,256;64,100,512,512')")
    p.add_argument("--square", type=int, default=2048, help="size n of the n^3 square GEMM (0: none)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per GEMM; the median is reported")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--json", default=os.path.join(here, "results", "bench_gemm.json"),
                   help="results file ('' to skip)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, fast_mm = DTYPES[args.dtype], fastrnn_mm()
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable), sys.argv[0]]
                                 + (sys.argv[1:] if argv is None else argv)),
                cpu=cpu_model(), threads=torch.get_num_threads(), dtype=args.dtype, torch=torch.__version__,
                python=platform.python_version(), fastrnn_mm=fast_mm is not None, repeats=args.repeats,
                loadavg_start=load_average(), l2_read_gbps_per_core=l2_read_gbps())
    print(f"# {info['cpu']} | {info['threads']} threads | {args.dtype} | torch {info['torch']} | {info['date']}")
    print(f"# GFLOP/s, median of {args.repeats} after 1 warm-up; % = of the faster of torch.mm and oneDNN "
          f"on that GEMM | fastrnn.mm {'present' if fast_mm else 'absent'} | load average {info['loadavg_start']}")
    print(f"# read bandwidth of one core from 512 KiB (torch.sum): {info['l2_read_gbps_per_core']:.0f} GB/s")

    # A generator: each layer's operands exist only while its rows run.
    cases = ((cell, shape, name, a, b) for shape in args.shapes for cell in args.cells
             for name, a, b in layer_gemms(cell, *shape, dtype))
    if args.square:
        n = args.square
        square = ("-", None, "square", torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
        cases = itertools.chain(cases, [square])

    header = ["cell", "B,T,I,H", "gemm", "M", "N", "K"] + [h for impl in IMPLS for h in (impl, "%")]
    widths = [4, 15, 11, 6, 6, 6] + [9, 4] * len(IMPLS)
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    rows, wrong = [], False
    for cell, shape, name, a, b in cases:
        (M, K), N = a.shape, b.shape[1]
        gflops, ms, notes = bench_one(a, b, args.repeats, fast_mm)
        best = max(gflops["torch.mm"], gflops.get("oneDNN", 0))
        row = dict(cell=cell, shape=shape, gemm=name, M=M, N=N, K=K, a_transposed=not a.is_contiguous(),
                   best_gflops=best, notes=notes)
        cells = [cell, ",".join(map(str, shape)) if shape else "-", name, M, N, K]
        for impl in IMPLS:
            key = impl.replace(".", "_").lower()
            rate = gflops.get(impl)
            row[f"{key}_gflops"], row[f"{key}_pct"], row[f"{key}_ms_all"] = (
                rate, 100 * rate / best if rate is not None else None, ms.get(impl))
            if rate is not None:
                cells += [f"{rate:.1f}", f"{100 * rate / best:.0f}"]
            else:
                cells += ["WRONG" if notes.get(impl, "").startswith("WRONG") else "n/a", ""]
        wrong = wrong or any(n.startswith("WRONG") for n in notes.values())
        rows.append(row)
        print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)).rstrip(), flush=True)

    for note in sorted({f"{impl}: {n}" for r in rows for impl, n in r["notes"].items()}):
        print(f"# {note}")
    info["loadavg_end"] = load_average()
    save_json(args.json, info, rows)
    if wrong:
        print("error: a GEMM disagrees with torch.mm, see the WRONG entries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
