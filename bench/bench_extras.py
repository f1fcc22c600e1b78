"""Benchmark fastrnn's extensions beyond torch.nn against what users write today, and
against the plain fused layer at the same shape, in the same process, interleaved.

Training steps (forward + backward w.r.t. the input and all weights), float32:
- resets=: fastrnn with episode starts inside the sequences, against splitting the rows
  at the resets and running the episodes as one packed batch through torch.nn (the
  episode layout is computed outside the timing);
- zoneout= / recurrent_dropout=: fastrnn against a per-step Python loop of torch.nn's
  cell with the same regularisation;
- weight_dropout=: fastrnn against torch.nn with AWD-LSTM's WeightDrop (dropout on
  weight_hh, then the module run on the masked weight through functional_call);
- layernorm: fastrnn.LayerNormLSTM / LayerNormGRU against a per-step Python loop of the
  cell's math with layer_norm (the input projection and its LayerNorm for all steps at once).
``plain`` is fastrnn without the extension at the same shape (fastrnn.LSTM / GRU);
``overhead`` = fastrnn ms / plain ms, ``speedup`` = baseline ms / fastrnn ms.

    python bench/bench_extras.py                       # LSTM and GRU, B=16, T=100, H=256
    python bench/bench_extras.py --cells lstm --shape 64,100,512,512
    python bench/bench_extras.py --cases layernorm --shape 2,5,8,8 --repeats 1   # smoke
"""
import argparse
import os
import statistics
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastrnn  # noqa: E402
from bench_rnn import cpu_model, time_interleaved  # noqa: E402

CELLS = {"lstm": "LSTM", "gru": "GRU"}
CASES = ("resets", "zoneout", "recurrent_dropout", "weight_dropout", "layernorm")
P = 0.1  # the regularisation probability of every case


def train_step(module, x, *inputs, **kw):
    params = list(module.parameters())

    def step():
        y, _ = module(x, **kw)
        torch.autograd.grad(y, [x, *params], torch.ones_like(y))
    return step


def episodes(resets):
    """Episode layout of resets [T, B]: (row, start, length) of every episode."""
    T, B = resets.shape
    out = []
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if resets[t, b]]
        out += [(b, s, e - s) for s, e in zip(starts, starts[1:] + [T])]
    return out


def split_at_resets(ref, x, resets):
    """What users write: every episode a sequence of its own in one packed batch."""
    T, B, _ = x.shape
    eps = episodes(resets)
    L = max(n for _, _, n in eps)
    # Gather index of every (step, episode) into x viewed as [T * B, I], padded with row 0.
    idx = torch.zeros(L, len(eps), dtype=torch.long)
    for k, (b, s, n) in enumerate(eps):
        idx[:n, k] = (torch.arange(s, s + n) * B + b)
    lengths = torch.tensor([n for _, _, n in eps])
    valid = torch.arange(L).unsqueeze(1) < lengths.unsqueeze(0)
    src = idx[valid]  # flat [T*B] positions of the valid entries, in the same order
    params = list(ref.parameters())

    def run():
        xe = x.reshape(T * B, -1)[idx]  # [L, E, I]
        packed = pack_padded_sequence(xe, lengths, enforce_sorted=False)
        ye, _ = pad_packed_sequence(ref(packed)[0], total_length=L)
        y = ye.new_zeros(T * B, ye.shape[-1]).index_copy(0, src, ye[valid])
        return y.view(T, B, -1)

    def step():
        y = run()
        torch.autograd.grad(y, [x, *params], torch.ones_like(y))
    return step, run


def cell_loop(kind, ref_cell, x, zoneout=0.0, recurrent_dropout=0.0):
    """A per-step Python loop of torch.nn's cell with zoneout / recurrent dropout."""
    T, B, _ = x.shape
    H = ref_cell.hidden_size
    params = list(ref_cell.parameters())
    w_ih, w_hh, b_ih, b_hh = ref_cell.weight_ih, ref_cell.weight_hh, ref_cell.bias_ih, ref_cell.bias_hh

    def step():
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        mask = (x.new_empty(B, H).bernoulli_(1 - recurrent_dropout) / (1 - recurrent_dropout)
                if recurrent_dropout else None)
        ys = []
        for t in range(T):
            hr = h * mask if mask is not None else h
            if kind == "LSTM":
                # torch's fused cell takes one h; recurrent dropout needs the masked one in the GEMM
                h_new, c_new = torch._VF.lstm_cell(x[t], (hr, c), w_ih, w_hh, b_ih, b_hh)
            else:
                h_new = torch._VF.gru_cell(x[t], hr, w_ih, w_hh, b_ih, b_hh)
                if mask is not None:  # GRU's z * h uses the unmasked h: recompute that term
                    gh = torch.nn.functional.linear(hr, w_hh, b_hh)
                    gx = torch.nn.functional.linear(x[t], w_ih, b_ih)
                    z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
                    h_new = h_new + z * (h - hr)
            if zoneout:
                zh = x.new_empty(B, H).bernoulli_(zoneout)
                h_new = zh * h + (1 - zh) * h_new
                if kind == "LSTM":
                    zc = x.new_empty(B, H).bernoulli_(zoneout)
                    c_new = zc * c + (1 - zc) * c_new
            h = h_new
            if kind == "LSTM":
                c = c_new
            ys.append(h)
        y = torch.stack(ys)
        torch.autograd.grad(y, [x, *params], torch.ones_like(y))
    return step


def weight_drop(ref, x):
    """AWD-LSTM's WeightDrop: dropout on weight_hh_l0, the module run on the masked weight."""
    params = dict(ref.named_parameters())

    def step():
        w = dict(params, weight_hh_l0=torch.nn.functional.dropout(params["weight_hh_l0"], P))
        y, _ = torch.func.functional_call(ref, w, (x,))
        torch.autograd.grad(y, [x, *params.values()], torch.ones_like(y))
    return step


def layernorm_loop(kind, module, x):
    """What users write for a LayerNorm LSTM/GRU today: the input projection and its
    LayerNorm for all steps at once, then a per-step Python loop of the cell's math with
    layer_norm on the recurrent projection (and on c), on ``module``'s parameters (layer 0)
    so that the result can be checked. Returns (training step, forward)."""
    T, B, _ = x.shape
    H, eps = module.hidden_size, module.eps
    p = {name[:-3]: t for name, t in module.named_parameters()}  # without the "_l0"
    gates = p["weight_hh"].shape[:1]  # (G * H,): LN_ih and LN_hh normalise all gates together
    ln = torch.nn.functional.layer_norm

    def run():
        gx = ln(x @ p["weight_ih"].t(), gates, p["ln_ih_weight"], p["ln_ih_bias"], eps)
        gx = gx + (p["bias"] if kind == "LSTM" else p["bias_ih"])
        h = c = x.new_zeros(B, H)
        ys = []
        for t in range(T):
            gh = ln(h @ p["weight_hh"].t(), gates, p["ln_hh_weight"], p["ln_hh_bias"], eps)
            if kind == "LSTM":
                i, f, g, o = (gx[t] + gh).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(ln(c, (H,), p["ln_c_weight"],
                                                     p["ln_c_bias"], eps))
            else:
                a_r, a_z, a_n = gx[t].chunk(3, 1)
                b_r, b_z, b_n = (gh + p["bias_hh"]).chunk(3, 1)
                r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
                h = (1 - z) * torch.tanh(a_n + r * b_n) + z * h
            ys.append(h)
        return torch.stack(ys)

    def step():
        y = run()
        torch.autograd.grad(y, [x, *p.values()], torch.ones_like(y))
    return step, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--cases", default=",".join(CASES), help="some of " + ",".join(CASES))
    ap.add_argument("--shape", default="16,100,256,256", help="B,T,I,H")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--episode", type=int, default=20, help="mean episode length (resets)")
    args = ap.parse_args(argv)
    B, T, I, H = (int(v) for v in args.shape.split(","))
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {','.join(CASES)}")
    device = torch.device("cpu")
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"float32, B={B} T={T} I={I} H={H}, p={P}, mean episode {args.episode} steps")
    print(f"{'cell':5} {'case':18} {'baseline ms':>11} {'fastrnn ms':>10} {'speedup':>8} "
          f"{'plain ms':>9} {'overhead':>9}")
    for cell in args.cells.split(","):
        kind = CELLS[cell]
        torch.manual_seed(0)
        ref = getattr(torch.nn, kind)(I, H)
        ref_cell = getattr(torch.nn, kind + "Cell")(I, H)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref_cell, name).copy_(getattr(ref, name + "_l0"))
        x = torch.randn(T, B, I, requires_grad=True)
        resets = torch.rand(T, B) < 1 / args.episode

        def fast(**kw):
            m = getattr(fastrnn, kind)(I, H, **kw)
            m.load_state_dict(ref.state_dict())
            return m

        plain = train_step(fast(), x)
        split_step, split_run = split_at_resets(ref, x, resets)
        with_resets = fast()
        torch.testing.assert_close(with_resets(x, resets=resets)[0], split_run(),
                                   atol=1e-4, rtol=1e-4)  # the same episodes, the same result
        layer_norm = getattr(fastrnn, "LayerNorm" + kind)(I, H)
        ln_step, ln_run = layernorm_loop(kind, layer_norm, x)
        # Both drift from the float64 result as the steps go (about 1e-4..1e-3 after 100
        # steps for LayerNorm LSTM, in either implementation): a sanity check, no more.
        torch.testing.assert_close(layer_norm(x)[0], ln_run(), atol=5e-3, rtol=0)
        cases = [
            ("resets", split_step, train_step(with_resets, x, resets=resets)),
            ("zoneout", cell_loop(kind, ref_cell, x, zoneout=P), train_step(fast(zoneout=P), x)),
            ("recurrent_dropout", cell_loop(kind, ref_cell, x, recurrent_dropout=P),
             train_step(fast(recurrent_dropout=P), x)),
            ("weight_dropout", weight_drop(ref, x), train_step(fast(weight_dropout=P), x)),
            ("layernorm", ln_step, train_step(layer_norm, x)),
        ]
        for name, baseline, fused in cases:
            if name not in args.cases.split(","):
                continue
            times = time_interleaved({"base": baseline, "fast": fused, "plain": plain},
                                     args.repeats, args.warmup, device)
            t_base, t_fast, t_plain = (statistics.median(times[k]) for k in ("base", "fast", "plain"))
            print(f"{cell:5} {name:18} {t_base * 1e3:11.2f} {t_fast * 1e3:10.2f} "
                  f"{t_base / t_fast:8.2f} {t_plain * 1e3:9.2f} {t_fast / t_plain:9.2f}")


if __name__ == "__main__":
    main()
