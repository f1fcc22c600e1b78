"""Shared plumbing for the examples: arguments, backend choice, per-epoch
timing and history, and the learning-curve plot.

Every example follows the same shape::

    def main(argv=None):
        args = parse_args(__doc__, argv, epochs=20, smoke_epochs=2, name="digits_gru")
        data = ...                                   # built once, shared by both backends
        def train(backend, hist):                    # one full training run
            nn = rnn_modules(backend)                # fastrnn or torch.nn
            model = Model(nn, ...)                   # same seed -> same initial weights
            for epoch in hist.epochs(args.epochs):
                with hist.clock():                   # only training is timed
                    loss = ...
                hist.log(loss=loss, metric=evaluate(model))
        return run(args, train, metric="test accuracy")

``run`` trains once per selected backend (``--backend fastrnn|torch|both``),
prints the final metric and the time per epoch of each, writes the PNG and
returns ``{backend: History}``.
"""
import argparse
import os
import random
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

import fastrnn

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("fastrnn", "torch")


def parse_args(description, argv=None, *, name, epochs, smoke_epochs=2, extra=None):
    """Common flags; ``extra(parser)`` may add an example's own flags."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("fastrnn", "torch", "both"), default="both",
                   help="which RNN modules to train with; 'both' trains the same model "
                        "(same data, same initial weights) with each and plots them together "
                        "(default: both)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default: {epochs}, or {smoke_epochs} with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny data and model: runs in seconds, to check that everything works")
    p.add_argument("--seed", type=int, default=0, help="seed for data, weights and batches")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(HERE, "results", f"{name}.png"),
                   help=f"PNG with the learning curves and time per epoch "
                        f"(default: examples/results/{name}.png); '' skips it")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = smoke_epochs if args.smoke else epochs
    args.name = name
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def rnn_modules(backend):
    """The namespace to build recurrent layers from: ``fastrnn`` or ``torch.nn``.

    Both have LSTM, GRU, RNN, LSTMCell, GRUCell and RNNCell with the same
    arguments, parameters and initialisation.
    """
    if backend == "fastrnn":
        return fastrnn
    if backend == "torch":
        return torch.nn
    raise ValueError(f"unknown backend {backend!r}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class History:
    """Per-epoch training loss, evaluation metric and training wall-clock."""

    def __init__(self, backend, metric, progress=True):
        self.backend = backend
        self.metric_name = metric
        self.loss, self.metric, self.seconds = [], [], []
        self.extra = {}  # anything else an example wants to return (e.g. samples)
        self._progress = progress
        self._bar = None

    def epochs(self, n):
        """Iterate over epoch numbers, with a progress bar on stderr."""
        from tqdm import tqdm

        self._bar = tqdm(range(n), desc=f"{self.backend:>7}", unit="epoch",
                         file=sys.stderr, disable=not self._progress, dynamic_ncols=True)
        for epoch in self._bar:
            yield epoch
        self._bar.close()

    @contextmanager
    def clock(self):
        """Time the block (the training part of an epoch)."""
        start = time.perf_counter()
        yield
        self.seconds.append(time.perf_counter() - start)

    def log(self, loss, metric):
        self.loss.append(float(loss))
        self.metric.append(float(metric))
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4g}, {self.metric_name} {metric:.4g}")

    @property
    def final(self):
        return self.metric[-1]

    @property
    def median_seconds(self):
        # The first epoch includes one-off warm-up (allocations, weight packing).
        times = self.seconds[1:] or self.seconds
        return statistics.median(times)


def run(args, train, *, metric, baseline=None, baseline_label="baseline",
        fmt="{:.4f}"):
    """Train with each selected backend, report, plot; returns {backend: History}.

    ``train(backend, history)`` does one complete run. The torch RNG is reseeded
    before each so that both backends start from the same weights and see the
    same batches: their curves should lie on top of each other, and only the
    time per epoch differs.
    """
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    results = {}
    for backend in backends:
        seed_everything(args.seed)
        hist = History(backend, metric, progress=not args.no_progress)
        train(backend, hist)
        results[backend] = hist
        print(f"[{args.name}] {backend:>7}: {metric} = {fmt.format(hist.final)}, "
              f"train loss {hist.loss[0]:.4f} -> {hist.loss[-1]:.4f}, "
              f"{hist.median_seconds:.3f} s/epoch (median), "
              f"{sum(hist.seconds):.1f} s training in total")
    if baseline is not None:
        print(f"[{args.name}] {baseline_label}: {metric} = {fmt.format(baseline)}")
    if len(results) == 2:
        speedup = results["torch"].median_seconds / results["fastrnn"].median_seconds
        print(f"[{args.name}] time per epoch, torch.nn / fastrnn = {speedup:.2f}x")
    if args.out:
        plot(results, args.out, title=args.name, baseline=baseline, baseline_label=baseline_label,
             fmt=fmt)
        print(f"[{args.name}] wrote {args.out}")
    return results


COLORS = {"fastrnn": "tab:blue", "torch": "tab:orange"}
STYLES = {"fastrnn": "-", "torch": "--"}


def plot(results, path, *, title, baseline=None, baseline_label="baseline", fmt="{:.4f}"):
    """Three panels: training loss, evaluation metric, seconds per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    any_hist = next(iter(results.values()))
    for backend, h in results.items():
        label = "fastrnn" if backend == "fastrnn" else "torch.nn"
        x = range(1, len(h.loss) + 1)
        style = dict(color=COLORS[backend], linestyle=STYLES[backend], label=label)
        axes[0].plot(x, h.loss, **style)
        axes[1].plot(x, h.metric, **style)
        axes[2].plot(x, h.seconds, marker="o", markersize=3, **style)
    if baseline is not None:
        axes[1].axhline(baseline, color="gray", linestyle=":", label=baseline_label)
    axes[0].set(title="training loss", xlabel="epoch", ylabel="loss")
    lo = min(min(h.loss) for h in results.values())
    hi = max(max(h.loss) for h in results.values())
    if lo > 0 and hi / lo > 20:  # losses that fall by orders of magnitude
        axes[0].set_yscale("log")
    axes[1].set(title=any_hist.metric_name, xlabel="epoch", ylabel=any_hist.metric_name)
    axes[2].set(title="wall-clock per epoch (training)", xlabel="epoch", ylabel="seconds")
    axes[2].set_ylim(bottom=0)
    summary = ", ".join(
        f"{'fastrnn' if b == 'fastrnn' else 'torch.nn'}: {fmt.format(h.final)} "
        f"({h.median_seconds:.2f} s/epoch)" for b, h in results.items())
    fig.suptitle(f"{title} -- final {any_hist.metric_name}: {summary}")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def batches(n, batch_size, generator, shuffle=True):
    """Index tensors covering range(n) in (shuffled) batches."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return order.split(batch_size)


def run_padded(rnn, x, lengths, hx=None):
    """Run a batch_first ``rnn`` on padded ``x`` [B, T, *] with valid ``lengths`` [B].

    fastrnn takes the lengths directly (``lengths=``): padded steps are skipped
    in the kernel, outputs there are zero and the final state is each
    sequence's own last step. torch.nn needs the pack / unpack round trip for
    the same result.
    """
    if isinstance(rnn, (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN)):
        return rnn(x, hx, lengths=lengths)
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = rnn(packed, hx)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
    return out, state
