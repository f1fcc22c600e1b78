"""Recurrent policy-style training on RL rollouts: many episodes per sequence, ``resets=``.

A generated memory task, partially observable and episodic (nothing is downloaded).
Each of ``--envs`` environments produces a stream of back-to-back episodes of random
lengths (``--min-len`` .. ``--max-len`` steps). Every step shows one of ``--symbols``
symbols (one-hot), drawn at random. The target at every step of an episode is the
symbol shown at its *first* step, the cue: later steps show distractors from the same
symbols, so nothing in the observations marks where an episode starts. Only the
environments' done flags do, as in a real rollout buffer. The model must remember the
cue for the whole episode and drop it at the next boundary. Without memory it is at
chance (1 / symbols) after the first step; with memory but no resets it cannot tell
which symbol was the cue (the same model trained without them stays near 35 % with the
defaults, against 100 % with them).

A rollout is ``--steps`` steps of every environment, so one rollout [T, B] holds
several episodes per row. Each rollout starts with freshly reset environments (state
zero), and the flags give the resets mask: ``resets[t, b]`` is set where step t of
environment b starts an episode. The rule is that the state entering such a step is
the initial state (here zeros) again, not what the previous step left. The model is
an LSTM and a linear head, trained with cross-entropy at every step:

* fastrnn: one call over the whole rollout, ``lstm(obs, resets=resets)``: the resets
  are applied inside the fused kernel, forward and backward;
* torch.nn: what recurrent PPO code does today (e.g. CleanRL's PPO-LSTM): the same
  ``nn.LSTM`` (same weights) run one step at a time in a Python loop, the state
  multiplied by ``1 - done`` before each step.

Both compute the same thing, so their curves match up to float rounding (which can move
a sudden drop of the loss by an epoch) and only the time differs. The metric is the
accuracy of recalling the cue at the episodes' later steps (every step but the first) on
held-out rollouts.

    python examples/rollout_resets.py                    # fastrnn and torch.nn, ~40 s
    python examples/rollout_resets.py --backend fastrnn --max-len 60 --epochs 30
"""
import torch
import torch.nn.functional as F
from torch import nn

import fastrnn
from common import parse_args, rnn_modules, run


def make_rollouts(n, steps, envs, symbols, min_len, max_len, generator):
    """n rollouts of ``envs`` streams of ``steps`` steps, time-major:
    observations [n, T, B] (symbol ids), resets [n, T, B] (bool, step starts an
    episode; always set at t = 0) and targets [n, T, B] (each episode's first symbol)."""
    obs = torch.randint(symbols, (n, envs, steps), generator=generator)
    # Episode lengths laid end to end: episode k of a stream starts at their sum before k.
    lengths = torch.randint(min_len, max_len + 1, (n, envs, steps // min_len + 1),
                            generator=generator)
    starts = (lengths.cumsum(-1) - lengths).clamp(max=steps)  # `steps` = past the rollout
    resets = torch.zeros(n, envs, steps + 1, dtype=torch.bool)
    resets.scatter_(-1, starts, True)
    resets = resets[..., :steps]
    # Start of the episode each step belongs to: the latest reset at or before it.
    time = torch.arange(steps).expand_as(obs)
    first = torch.where(resets, time, 0).cummax(-1).values
    targets = obs.gather(-1, first)
    return tuple(t.transpose(1, 2).contiguous() for t in (obs, resets, targets))


class RecurrentAgent(nn.Module):
    def __init__(self, rnn_lib, symbols, hidden_size):
        super().__init__()
        self.symbols = symbols
        self.lstm = rnn_lib.LSTM(symbols, hidden_size)
        self.head = nn.Linear(hidden_size, symbols)

    def forward(self, obs, resets):                  # obs, resets: [T, B] -> logits [T, B, K]
        x = F.one_hot(obs, self.symbols).float()
        if isinstance(self.lstm, fastrnn.LSTM):
            out, _ = self.lstm(x, resets=resets)     # one call, every episode in it
        else:
            out = self.step_by_step(x, resets)
        return self.head(out)

    def step_by_step(self, x, resets):
        """torch.nn: one step at a time, state zeroed where an episode starts."""
        T, B, _ = x.shape
        h = x.new_zeros(1, B, self.lstm.hidden_size)
        c = torch.zeros_like(h)
        keep = (~resets).float().view(T, 1, B, 1)    # 1 - done
        outs = []
        for t in range(T):
            out, (h, c) = self.lstm(x[t:t + 1], (keep[t] * h, keep[t] * c))
            outs.append(out)
        return torch.cat(outs)


def main(argv=None):
    def extra(p):
        p.add_argument("--envs", type=int, default=32, help="environments (rows) per rollout")
        p.add_argument("--steps", type=int, default=128, help="steps per rollout")
        p.add_argument("--rollouts", type=int, default=24, help="training rollouts per epoch")
        p.add_argument("--symbols", type=int, default=4, help="distinct cues")
        p.add_argument("--min-len", type=int, default=4, help="shortest episode")
        p.add_argument("--max-len", type=int, default=40, help="longest episode")
        p.add_argument("--hidden", type=int, default=128)
        p.add_argument("--lr", type=float, default=3e-3)

    args = parse_args(__doc__, argv, name="rollout_resets", epochs=15, smoke_epochs=3,
                      extra=extra)
    if args.smoke:
        args.envs, args.steps, args.rollouts, args.hidden = 16, 48, 6, 32
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.steps, args.envs, args.symbols, args.min_len, args.max_len, gen)
    train_data = make_rollouts(args.rollouts, *shape)
    test_obs, test_resets, test_targets = make_rollouts(8, *shape)
    later = ~test_resets                             # steps that need memory
    episodes = int(train_data[1].sum())
    print(f"[{args.name}] {args.rollouts} rollouts of {args.steps} steps x {args.envs} "
          f"environments per epoch, {episodes} episodes "
          f"({args.rollouts * args.steps * args.envs / episodes:.1f} steps on average)")

    @torch.no_grad()
    def recall_accuracy(model):
        model.eval()
        correct = sum(((model(o, r).argmax(-1) == y) & m).sum().item()
                      for o, r, y, m in zip(test_obs, test_resets, test_targets, later))
        model.train()
        return correct / later.sum().item()

    def train(backend, hist):
        model = RecurrentAgent(rnn_modules(backend), args.symbols, args.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        for _ in hist.epochs(args.epochs):
            total = 0.0
            with hist.clock():
                for obs, resets, targets in zip(*train_data):
                    logits = model(obs, resets)
                    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    total += loss.item()
            hist.log(loss=total / args.rollouts, metric=recall_accuracy(model))

    return run(args, train, metric="cue recall accuracy", baseline=1 / args.symbols,
               baseline_label="chance")


if __name__ == "__main__":
    main()
