"""Time-series forecasting: yearly sunspot numbers with an LSTM.

statsmodels ships the yearly mean sunspot numbers 1700-2008
(``statsmodels.datasets.sunspots``). From the last ``--window`` years the model
predicts the next ``--horizon`` years at once (an LSTM reads the window; a linear
layer maps its final state to the horizon). Values are square-rooted (which
evens out the variance of the ~11-year cycle's peaks) and standardised with
statistics of the training years only.

Forecasts whose first year is before 1950 train the model; those from 1950 on
are the test set. The metric is the mean absolute error in sunspot numbers
over all test forecasts and horizons, against the naive forecast that repeats
the last observed value.

    python examples/forecast_sunspots.py                 # fastrnn and torch.nn, ~1 min
    python examples/forecast_sunspots.py --horizon 5 --backend fastrnn
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import batches, parse_args, rnn_modules, run

TEST_FROM = 1950  # first forecast year of the test set


class Forecaster(nn.Module):
    def __init__(self, rnn_lib, hidden_size, horizon, num_layers=2):
        super().__init__()
        self.lstm = rnn_lib.LSTM(1, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, horizon)

    def forward(self, window):                     # window: [B, W, 1]
        _, (h_n, _) = self.lstm(window)
        return self.head(h_n[-1])                  # [B, horizon]


def load_data(window, horizon):
    """Windows x [N, W, 1], targets y [N, horizon] (both transformed), first
    forecast years [N], and the functions between sunspot numbers and model units."""
    from statsmodels.datasets import sunspots

    df = sunspots.load_pandas().data
    years = df["YEAR"].to_numpy().astype(int)
    values = df["SUNACTIVITY"].to_numpy(dtype=np.float64)
    train_part = np.sqrt(values[years < TEST_FROM])
    mean, std = train_part.mean(), train_part.std()

    def encode(v):
        return (np.sqrt(v) - mean) / std

    def decode(z):
        return np.clip(z * std + mean, 0, None) ** 2

    series = encode(values)
    starts = range(window, len(series) - horizon + 1)  # index of the first forecast year
    x = np.stack([series[s - window:s] for s in starts])[:, :, None]
    y = np.stack([series[s:s + horizon] for s in starts])
    first_year = years[list(starts)]
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_tensor(x), as_tensor(y), first_year, encode, decode


def main(argv=None):
    def extra(p):
        p.add_argument("--window", type=int, default=30, help="years of history fed to the model")
        p.add_argument("--horizon", type=int, default=3, help="years predicted at once")

    args = parse_args(__doc__, argv, name="forecast_sunspots", epochs=150, smoke_epochs=5,
                      extra=extra)
    x, y, first_year, _, decode = load_data(args.window, args.horizon)
    test = torch.from_numpy(first_year >= TEST_FROM)
    x_tr, y_tr, x_te, y_te = x[~test], y[~test], x[test], y[test]
    truth = decode(y_te.numpy())                                       # sunspot numbers
    naive = decode(np.repeat(x_te[:, -1].numpy(), args.horizon, axis=1))  # last value, repeated
    naive_mae = float(np.abs(naive - truth).mean())
    hidden = 16 if args.smoke else 64

    def test_mae(model):
        model.eval()
        with torch.no_grad():
            pred = decode(model(x_te).numpy())
        model.train()
        return float(np.abs(pred - truth).mean())

    def train(backend, hist):
        model = Forecaster(rnn_modules(backend), hidden, args.horizon)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        gen = torch.Generator().manual_seed(args.seed)
        for _ in hist.epochs(args.epochs):
            total = 0.0
            with hist.clock():
                for idx in batches(len(x_tr), 32, gen):
                    loss = F.mse_loss(model(x_tr[idx]), y_tr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                sched.step()
            hist.log(loss=total / len(x_tr), metric=test_mae(model))
        hist.extra["naive_mae"] = naive_mae
        pred = decode(model.eval()(x_te).detach().numpy())
        per_h = np.abs(pred - truth).mean(axis=0)
        naive_h = np.abs(naive - truth).mean(axis=0)
        print(f"[{args.name}] {backend:>7}: test MAE by horizon (years ahead): " + ", ".join(
            f"+{h + 1}: {m:.1f} (naive {n:.1f})" for h, (m, n) in enumerate(zip(per_h, naive_h))))

    return run(args, train, metric="test MAE (sunspots)",
               baseline=naive_mae, baseline_label="naive: last value", fmt="{:.2f}")


if __name__ == "__main__":
    main()
