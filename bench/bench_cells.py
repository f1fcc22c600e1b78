"""One step per call: fastrnn's cells against torch.nn's, as a Python loop over time steps
(a decoder, a policy acting step by step, attention between steps) calls them.

For each cell and (B, H) (I = H), the time of one call, median of several runs, fastrnn and
torch.nn interleaved, with the same weights and inputs:
  inference  the cell's forward under torch.inference_mode
  training   forward, then backward of the new state's sum (gradients for the input, the
             state and every weight, accumulated into .grad as an optimiser step would see)
and the ratio torch.nn / fastrnn (above 1: fastrnn is faster).

    python bench/bench_cells.py
    python bench/bench_cells.py --cells lstm --shapes "1,256;16,512" --repeats 2000
    python bench/bench_cells.py --cpu-kernels avx2     # what an AVX2-only CPU runs
"""
import argparse
import statistics
import sys
import time

import torch

import fastrnn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_rnn import add_cpu_options, apply_cpu_options, cpu_model  # noqa: E402

CELLS = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn": "RNNCell"}


def per_call_us(fns, repeats, runs):
    """Median microseconds per call of each fn, the runs of all fns interleaved."""
    for fn in fns:
        for _ in range(max(10, repeats // 10)):
            fn()
    samples = [[] for _ in fns]
    for _ in range(runs):
        for fn, s in zip(fns, samples):
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            s.append((time.perf_counter() - t) / repeats * 1e6)
    return [statistics.median(s) for s in samples]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru,rnn")
    p.add_argument("--shapes", default="1,64;1,256;16,256;64,512", help="B,H;B,H;...")
    p.add_argument("--repeats", type=int, default=500, help="calls per timed run")
    p.add_argument("--runs", type=int, default=7)
    add_cpu_options(p)
    args = p.parse_args(argv)
    apply_cpu_options(p, args)
    print(f"# {cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"CPU kernels {fastrnn.ops._C.cpu_kernels()} | float32 | microseconds per call, "
          f"median of {args.runs} x {args.repeats}, interleaved")
    print(f"{'cell':>8} {'mode':>9} {'B':>4} {'H':>5} {'torch.nn':>9} {'fastrnn':>9} {'ratio':>6}")
    for name in args.cells.split(","):
        for shape in args.shapes.split(";"):
            B, H = (int(v) for v in shape.split(","))
            torch.manual_seed(0)
            fast = getattr(fastrnn, CELLS[name])(H, H)
            ref = getattr(torch.nn, CELLS[name])(H, H)
            ref.load_state_dict(fast.state_dict())
            x = torch.randn(B, H, requires_grad=True)
            state = (torch.randn(B, H), torch.randn(B, H)) if name == "lstm" else torch.randn(B, H)

            def infer(cell):
                def call():
                    with torch.inference_mode():
                        cell(x, state)
                return call

            def train(cell):
                def call():
                    out = cell(x, state)
                    (out[0] if isinstance(out, tuple) else out).sum().backward()
                return call

            for mode, make in (("inference", infer), ("training", train)):
                nn_us, fast_us = per_call_us([make(ref), make(fast)], args.repeats, args.runs)
                print(f"{CELLS[name]:>8} {mode:>9} {B:4d} {H:5d} {nn_us:9.1f} {fast_us:9.1f} "
                      f"{nn_us / fast_us:6.2f}")


if __name__ == "__main__":
    main()
