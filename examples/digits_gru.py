"""Sequence classification: handwritten digits read row by row with a GRU.

scikit-learn ships 1,797 8x8 images of digits (``sklearn.datasets.load_digits``).
Each image becomes a sequence of 8 steps, one row of 8 pixels per step; a 2-layer
GRU reads them and its final hidden state goes through a linear layer to the 10
classes. A stratified 25 % of the images is held out for testing. Target: test
accuracy >= 95 %.

    python examples/digits_gru.py                     # fastrnn and torch.nn, ~1 min
    python examples/digits_gru.py --backend fastrnn --epochs 40
"""
import torch
import torch.nn.functional as F
from torch import nn

from common import batches, parse_args, rnn_modules, run


class RowGRU(nn.Module):
    def __init__(self, rnn_lib, hidden_size, num_layers=2, dropout=0.2):
        super().__init__()
        self.gru = rnn_lib.GRU(8, hidden_size, num_layers=num_layers, batch_first=True,
                               dropout=dropout)
        self.head = nn.Linear(hidden_size, 10)

    def forward(self, images):          # images: [B, 8 rows, 8 pixels]
        _, h_n = self.gru(images)       # h_n: [num_layers, B, H]
        return self.head(h_n[-1])       # logits from the last layer's final state


def load_data(seed, smoke):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # pixels are 0..16
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y,
                                              random_state=seed)
    if smoke:
        x_tr, y_tr, x_te, y_te = x_tr[:256], y_tr[:256], x_te[:128], y_te[:128]
    return x_tr, y_tr, x_te, y_te


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def main(argv=None):
    args = parse_args(__doc__, argv, name="digits_gru", epochs=30, smoke_epochs=3)
    x_tr, y_tr, x_te, y_te = load_data(args.seed, args.smoke)
    hidden = 32 if args.smoke else 128

    def train(backend, hist):
        model = RowGRU(rnn_modules(backend), hidden)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        gen = torch.Generator().manual_seed(args.seed)
        for _ in hist.epochs(args.epochs):
            total = 0.0
            with hist.clock():
                for idx in batches(len(x_tr), 64, gen):
                    loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                sched.step()
            hist.log(loss=total / len(x_tr), metric=accuracy(model, x_te, y_te))

    return run(args, train, metric="test accuracy")


if __name__ == "__main__":
    main()
