"""Fixed cost of one fastrnn layer call: how much the Python side adds to the kernel.

On a layer so small that the kernel does almost nothing (T=1, B=1, I=H=8 by default),
times, median of many calls:
  module     fastrnn.LSTM/GRU/RNN(x) (argument checks, state, weights, autograd wiring)
  op         the op on the same, already prepared arguments, as the module calls it
             (fastrnn.ops.run_forward: torch.ops.fastrnn.forward, with its C++ autograd
             where a gradient can flow)
  torch.nn   the torch.nn module, for reference
and reports module - op as the Python overhead per layer call, in inference
(torch.inference_mode, and torch.no_grad) and with autograd recording (training forward).

    python bench/bench_overhead.py
    python bench/bench_overhead.py --cells lstm --size 1,1,8,8 --repeats 5000
"""
import argparse
import contextlib
import statistics
import sys
import time

import torch

import fastrnn
from fastrnn import ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_rnn import cpu_model  # noqa: E402

CELLS = {"lstm": ("LSTM", "lstm"), "gru": ("GRU", "gru"), "rnn": ("RNN", "rnn_tanh")}


def per_call_us(fn, repeats):
    for _ in range(max(10, repeats // 10)):
        fn()
    samples = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append((time.perf_counter() - t) / repeats * 1e6)
    return statistics.median(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru,rnn")
    p.add_argument("--size", default="1,1,8,8", help="T,B,I,H")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    T, B, I, H = (int(v) for v in args.size.split(","))
    print(f"# {cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"T={T} B={B} I={I} H={H} | microseconds per call, median of 7 x {args.repeats}")
    print(f"{'cell':>5} {'mode':>9} {'module':>8} {'op':>8} {'overhead':>9} {'torch.nn':>9}")
    for name in args.cells.split(","):
        cls, cell = CELLS[name]
        torch.manual_seed(0)
        fast = getattr(fastrnn, cls)(I, H)
        ref = getattr(torch.nn, cls)(I, H)
        x = torch.randn(T, B, I)
        lstm = cell == "lstm"
        w = [fast.weight_ih_l0, fast.weight_hh_l0, fast.bias_ih_l0, fast.bias_hh_l0]
        if not hasattr(ops, "autograd_forward"):  # older fastrnn: the op takes [1, ...] only
            w = [t.unsqueeze(0) for t in w]
        h0 = torch.zeros(1, B, H)
        run = getattr(ops, "run_forward", ops.forward)  # older fastrnn: the op itself
        modes = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
                 "training": contextlib.nullcontext}
        for mode, context in modes.items():
            save = mode == "training"

            def op_call():
                return run(cell, x, h0, h0 if lstm else None, *w, None, None, False, save)

            with context():
                times = [per_call_us(f, args.repeats) for f in (lambda: fast(x), op_call,
                                                                 lambda: ref(x))]
            module, op, nn = times
            print(f"{name:>5} {mode:>9} {module:8.1f} {op:8.1f} {module - op:9.1f} {nn:9.1f}")


if __name__ == "__main__":
    main()
