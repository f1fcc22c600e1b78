"""Encoder-decoder with attention: human-written dates to ISO 8601.

Pairs are generated with ``datetime``: a random day between 1950 and 2049,
written in one of several formats ("3 March 2017", "Fri, Mar 3, 2017",
"the 3rd of march 2017", "03.03.17", "3/3/2017", ...), and its ISO form
"2017-03-03". Two-digit years mean 1950-2049, dots are day.month.year and
slashes month/day/year, as in the generator.

* Encoder: character embedding -> bidirectional GRU over the padded input with
  ``lengths=``.
* Decoder: a GRUCell, one output character per step. At each step it attends
  over the encoder outputs (Luong "general" scores, padding masked out) and gets
  the previous character and the previous attention context as input. It starts
  from a start token and ends with an end-of-sequence token (EOS).
* Training: teacher forcing (the decoder is fed the true previous character),
  cross-entropy over every output character including EOS.
* Evaluation: greedy decoding (feed back the argmax until EOS); the metric is
  exact match of the whole decoded string on held-out dates.

    python examples/dates_seq2seq.py                     # fastrnn and torch.nn, ~2-3 min
    python examples/dates_seq2seq.py --backend fastrnn --epochs 5
"""
import datetime
import random

import torch
import torch.nn.functional as F
from torch import nn

from common import batches, parse_args, rnn_modules, run, run_padded

FIRST_DAY = datetime.date(1950, 1, 1).toordinal()
LAST_DAY = datetime.date(2049, 12, 31).toordinal()


def ordinal(n):
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


FORMATS = [
    lambda d: f"{d.day} {d:%B %Y}",            # 3 March 2017
    lambda d: f"{d:%B} {d.day}, {d.year}",     # March 3, 2017
    lambda d: f"{d:%b %d %Y}",                 # Mar 03 2017
    lambda d: f"{d:%a, %b} {d.day}, {d.year}",  # Fri, Mar 3, 2017
    lambda d: f"{d:%A %d %B %Y}",              # Friday 03 March 2017
    lambda d: f"the {ordinal(d.day)} of {d:%B %Y}",  # the 3rd of March 2017
    lambda d: f"{d:%d.%m.%Y}",                 # 03.03.2017
    lambda d: f"{d:%d.%m.%y}",                 # 03.03.17
    lambda d: f"{d.month}/{d.day}/{d.year}",   # 3/3/2017
    lambda d: f"{d:%d %b %y}",                 # 03 Mar 17
]


def make_pair(rng):
    d = datetime.date.fromordinal(rng.randint(FIRST_DAY, LAST_DAY))
    text = rng.choice(FORMATS)(d)
    if rng.random() < 0.3:
        text = text.lower()
    return text, d.isoformat()


PAD, SOS, EOS = 0, 1, 2
OUT_CHARS = "0123456789-"
OUT_VOCAB = {c: i + 3 for i, c in enumerate(OUT_CHARS)}


def encode_inputs(texts, vocab):
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.int64)
    x = torch.zeros(len(texts), int(lengths.max()), dtype=torch.int64)
    for i, t in enumerate(texts):
        x[i, :len(t)] = torch.tensor([vocab[c] for c in t])
    return x, lengths


def encode_targets(isos):
    return torch.tensor([[OUT_VOCAB[c] for c in s] + [EOS] for s in isos])  # [N, 11]


def decode_targets(ids):
    chars = {i: c for c, i in OUT_VOCAB.items()}
    out = []
    for row in ids.tolist():
        row = row[:row.index(EOS)] if EOS in row else row
        out.append("".join(chars.get(i, "?") for i in row))
    return out


class Seq2Seq(nn.Module):
    def __init__(self, rnn_lib, in_vocab, hidden_size):
        super().__init__()
        H = hidden_size
        self.src_embed = nn.Embedding(in_vocab, 32, padding_idx=PAD)
        self.encoder = rnn_lib.GRU(32, H, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * H, 2 * H)           # encoder final states -> decoder h0
        self.tgt_embed = nn.Embedding(3 + len(OUT_CHARS), 32)
        self.decoder = rnn_lib.GRUCell(32 + 2 * H, 2 * H)  # input: char + previous context
        self.attn = nn.Linear(2 * H, 2 * H, bias=False)  # score = enc_out . W h
        self.out = nn.Linear(4 * H, 3 + len(OUT_CHARS))

    def encode(self, src, lengths):
        src = src[:, :int(lengths.max())]
        enc_out, h_n = run_padded(self.encoder, self.src_embed(src), lengths)  # [B, T, 2H]
        h = torch.tanh(self.bridge(torch.cat([h_n[0], h_n[1]], dim=1)))
        mask = torch.arange(src.size(1))[None, :] >= lengths[:, None]          # True = padding
        return enc_out, mask, h

    def step(self, prev_token, h, context, enc_out, mask):
        """One decoder step: returns logits [B, V], new h, new context."""
        h = self.decoder(torch.cat([self.tgt_embed(prev_token), context], dim=1), h)
        scores = torch.bmm(enc_out, self.attn(h).unsqueeze(2)).squeeze(2)     # [B, T]
        weights = scores.masked_fill(mask, float("-inf")).softmax(dim=1)
        context = torch.bmm(weights.unsqueeze(1), enc_out).squeeze(1)         # [B, 2H]
        return self.out(torch.cat([h, context], dim=1)), h, context

    def forward(self, src, lengths, targets):
        """Teacher forcing: logits [B, L, V] for targets [B, L] (which end with EOS)."""
        enc_out, mask, h = self.encode(src, lengths)
        context = torch.zeros_like(h)
        prev = torch.full((src.size(0),), SOS, dtype=torch.int64)
        logits = []
        for t in range(targets.size(1)):
            step_logits, h, context = self.step(prev, h, context, enc_out, mask)
            logits.append(step_logits)
            prev = targets[:, t]                          # the true character, not the guess
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def greedy(self, src, lengths, max_len=12):
        enc_out, mask, h = self.encode(src, lengths)
        context = torch.zeros_like(h)
        prev = torch.full((src.size(0),), SOS, dtype=torch.int64)
        out = []
        done = torch.zeros(src.size(0), dtype=torch.bool)
        for _ in range(max_len):
            step_logits, h, context = self.step(prev, h, context, enc_out, mask)
            prev = step_logits.argmax(dim=1)
            out.append(prev)
            done |= prev == EOS
            if done.all():
                break
        return torch.stack(out, dim=1)


def main(argv=None):
    args = parse_args(__doc__, argv, name="dates_seq2seq", epochs=8, smoke_epochs=3)
    rng = random.Random(args.seed)
    n_train, n_test = (512, 128) if args.smoke else (8000, 2000)
    pairs = [make_pair(rng) for _ in range(n_train + n_test)]
    train_pairs, test_pairs = pairs[:n_train], pairs[n_train:]
    in_vocab = {c: i + 1 for i, c in enumerate(sorted({c for t, _ in pairs for c in t}))}
    x_tr, len_tr = encode_inputs([t for t, _ in train_pairs], in_vocab)
    y_tr = encode_targets([s for _, s in train_pairs])
    x_te, len_te = encode_inputs([t for t, _ in test_pairs], in_vocab)
    truth = [s for _, s in test_pairs]
    print(f"[{args.name}] {n_train} train / {n_test} test pairs, e.g. "
          + "; ".join(f"{t!r} -> {s!r}" for t, s in train_pairs[:3]))
    hidden = 16 if args.smoke else 64

    def exact_match(model, show=0):
        model.eval()
        guesses = []
        for idx in batches(len(x_te), 500, None, shuffle=False):
            guesses += decode_targets(model.greedy(x_te[idx], len_te[idx]))
        model.train()
        for (text, _), guess in list(zip(test_pairs, guesses))[:show]:
            print(f"    {text!r:32} -> {guess!r}")
        return sum(g == s for g, s in zip(guesses, truth)) / len(truth)

    def train(backend, hist):
        model = Seq2Seq(rnn_modules(backend), len(in_vocab) + 1, hidden)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        gen = torch.Generator().manual_seed(args.seed)
        for _ in hist.epochs(args.epochs):
            total = 0.0
            with hist.clock():
                for idx in batches(len(x_tr), 128, gen):
                    logits = model(x_tr[idx], len_tr[idx], y_tr[idx])
                    loss = F.cross_entropy(logits.flatten(0, 1), y_tr[idx].flatten())
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    total += loss.item() * len(idx)
                sched.step()
            hist.log(loss=total / len(x_tr), metric=exact_match(model))
        print(f"[{args.name}] {backend:>7}: greedy decoding of the first test dates:")
        exact_match(model, show=5)

    return run(args, train, metric="test exact match")


if __name__ == "__main__":
    main()
