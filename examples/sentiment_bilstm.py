"""Sentiment classification of variable-length text with a bidirectional LSTM.

The corpus is generated (``make_review``), so nothing is downloaded. A review is
built from clauses "<aspect> <verb> [negation] [intensifier] <adjective>", e.g.
"the acting was not very convincing", whose polarity is the adjective's,
flipped by a negation ("not", "never", "hardly", "n't"). Clauses are joined so
that the label depends on word order, not just on which words occur:

* "A and B": both clauses have the same polarity, which is the label;
* "A but B" and "although A , B": the clauses disagree and B decides;
* neutral sentences ("we saw it on a sunday .") are put before or after the
  opinion, so reviews run from about 5 to 60 tokens.

Tokens are lower-case words, with "n't" split off ("wasn't" -> "was", "n't").
Reviews are padded to the longest in the batch; the LSTM gets the true
``lengths=``, so the forward direction's final state is taken at each review's
last word and the backward direction starts there (with torch.nn the script
packs the batch instead, see ``common.run_padded``). The two final states feed
a linear classifier.

    python examples/sentiment_bilstm.py                  # fastrnn and torch.nn, ~1 min
    python examples/sentiment_bilstm.py --backend fastrnn --epochs 5
"""
import random
import re

import torch
import torch.nn.functional as F
from torch import nn

from common import batches, parse_args, rnn_modules, run, run_padded

ASPECTS = ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending",
           "the story", "the cast", "the script", "the dialogue", "the camera work",
           "the pacing", "the lead actor", "the villain", "the special effects"]
# Verb -> its base form after "did" ("be" forms take the negation after them).
VERBS = {"was": None, "is": None, "felt": "feel", "seemed": "seem", "looked": "look",
         "sounded": "sound"}
POSITIVE = ["good", "great", "brilliant", "wonderful", "charming", "moving", "clever",
            "delightful", "superb", "enjoyable", "fun", "beautiful", "convincing", "gripping"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "clumsy", "tedious", "weak", "bland",
            "painful", "silly", "forgettable", "predictable", "lifeless"]
INTENSIFIERS = ["really", "very", "truly", "quite", "rather", "pretty", "incredibly", "so"]
NEGATIONS = ["not", "never", "hardly", "n't"]
OPENERS = ["honestly ,", "i think", "to be fair ,", "overall ,", "in the end ,", "frankly ,",
           "if you ask me ,", ""]
NEUTRAL = ["we saw it on a {day} .", "it runs for about {n} minutes .",
           "i watched it with {who} .", "the cinema was {crowd} that night .",
           "it came out last {when} .", "there is a sequel planned for next year ."]
FILL = {"day": ["monday", "friday", "saturday", "sunday", "rainy evening"],
        "n": ["ninety", "a hundred", "two hundred", "eighty"],
        "who": ["my sister", "a friend", "my parents", "the whole family", "colleagues"],
        "crowd": ["half empty", "packed", "quiet", "noisy"],
        "when": ["week", "month", "year", "summer", "winter"]}


def verb_phrase(verb, negation):
    """"was" + "not" -> "was not"; "felt" + "n't" -> "didn't feel"; "felt" + "never" -> "never felt"."""
    base = VERBS[verb]
    if negation is None:
        return verb
    if base is None:  # a form of "be": the negation follows it
        return verb + negation if negation == "n't" else f"{verb} {negation}"
    if negation == "not":
        return f"did not {base}"
    if negation == "n't":
        return f"didn't {base}"
    return f"{negation} {verb}"


def clause(rng, positive):
    """One opinion clause with the given polarity, e.g. "the plot wasn't very clever"."""
    negation = rng.choice(NEGATIONS) if rng.random() < 0.4 else None
    # A negated clause needs an adjective of the opposite polarity.
    adjective = rng.choice(NEGATIVE if positive == (negation is not None) else POSITIVE)
    words = [rng.choice(ASPECTS), verb_phrase(rng.choice(list(VERBS)), negation)]
    if rng.random() < 0.4:
        words.append(rng.choice(INTENSIFIERS))
    words.append(adjective)
    return " ".join(words)


def neutral(rng):
    return rng.choice(NEUTRAL).format(**{k: rng.choice(v) for k, v in FILL.items()})


def make_review(rng):
    """(text, label) with label 1 = positive, 0 = negative."""
    label = rng.random() < 0.5
    kind = rng.choice(["single", "and", "but", "although"])
    if kind == "single":
        opinion = clause(rng, label)
    elif kind == "and":
        opinion = f"{clause(rng, label)} and {clause(rng, label)}"
    elif kind == "but":
        opinion = f"{clause(rng, not label)} but {clause(rng, label)}"
    else:
        opinion = f"although {clause(rng, not label)} , {clause(rng, label)}"
    parts = [f"{rng.choice(OPENERS)} {opinion} .".strip()]
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        parts.insert(rng.randrange(len(parts) + 1), neutral(rng))
    return " ".join(parts), int(label)


def tokenize(text):
    """Lower-case words and punctuation; "n't" becomes its own token."""
    return re.findall(r"[a-z]+(?=n't)|n't|[a-z']+|[.,!?]", text.lower())


def encode(texts, vocab):
    """Token ids padded with 0 into [N, T_max], and the lengths [N] (int64)."""
    ids = [[vocab.get(t, 1) for t in tokenize(s)] for s in texts]  # 1 = unknown word
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.int64)
    padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.int64)
    for i, s in enumerate(ids):
        padded[i, :len(s)] = torch.tensor(s)
    return padded, lengths


class BiLSTMClassifier(nn.Module):
    def __init__(self, rnn_lib, vocab_size, embed_dim, hidden_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = rnn_lib.LSTM(embed_dim, hidden_size, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden_size, 2)

    def forward(self, tokens, lengths):
        # Trim the batch to its own longest review, then let the LSTM skip the padding.
        tokens = tokens[:, :int(lengths.max())]
        _, (h_n, _) = run_padded(self.lstm, self.embed(tokens), lengths)
        # h_n: [2, B, H] = forward state at each review's last word, backward state at its first
        return self.head(torch.cat([h_n[0], h_n[1]], dim=1))


def main(argv=None):
    args = parse_args(__doc__, argv, name="sentiment_bilstm", epochs=6, smoke_epochs=3)
    rng = random.Random(args.seed)
    n_train, n_test = (400, 200) if args.smoke else (4000, 2000)
    train_set = [make_review(rng) for _ in range(n_train)]
    test_set = [make_review(rng) for _ in range(n_test)]
    words = sorted({t for text, _ in train_set for t in tokenize(text)})
    vocab = {w: i + 2 for i, w in enumerate(words)}  # 0 = padding, 1 = unknown
    x_tr, len_tr = encode([t for t, _ in train_set], vocab)
    x_te, len_te = encode([t for t, _ in test_set], vocab)
    y_tr = torch.tensor([y for _, y in train_set])
    y_te = torch.tensor([y for _, y in test_set])
    print(f"[{args.name}] {n_train} train / {n_test} test reviews, vocabulary {len(vocab) + 2}, "
          f"lengths {int(len_tr.min())}..{int(len_tr.max())} tokens; e.g. "
          f"{train_set[0][0]!r} -> {'positive' if train_set[0][1] else 'negative'}")
    hidden = 16 if args.smoke else 64

    def accuracy(model):
        model.eval()
        with torch.no_grad():
            correct = sum((model(x_te[idx], len_te[idx]).argmax(1) == y_te[idx]).sum().item()
                          for idx in batches(len(x_te), 256, None, shuffle=False))
        model.train()
        return correct / len(x_te)

    def train(backend, hist):
        model = BiLSTMClassifier(rnn_modules(backend), len(vocab) + 2, 32, hidden)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(args.seed)
        for _ in hist.epochs(args.epochs):
            total = 0.0
            with hist.clock():
                for idx in batches(len(x_tr), 64, gen):
                    loss = F.cross_entropy(model(x_tr[idx], len_tr[idx]), y_tr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
            hist.log(loss=total / len(x_tr), metric=accuracy(model))

    return run(args, train, metric="test accuracy")


if __name__ == "__main__":
    main()
