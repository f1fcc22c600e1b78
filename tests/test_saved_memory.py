"""The CPU pool of the large tensors the ops hand out (csrc/ops/saved_memory.h): what a
training forward saves for its backward, the outputs and the weight gradients. Blocks come
back for the next step, whatever they held before is overwritten, and
fastrnn.empty_cache() gives them back."""
import pytest
import torch

import fastrnn
from fastrnn import ops

from test_functional import CELLS, call, grads, make_inputs
from fastrnn import functional as F
from fastrnn import reference as R

# float64, T=50, B=64, H=176: y and every saved tensor are well above the pool's minimum of
# 256 KiB (hprev: 50*64*176*8 bytes = 4.3 MiB).
SIZE = (50, 64, 8, 176)
MIN_BYTES = 256 << 10


@pytest.fixture(autouse=True)
def empty_pool():
    fastrnn.empty_cache()
    yield
    fastrnn.empty_cache()


@pytest.mark.parametrize("cell", CELLS)
def test_blocks_are_reused_and_overwritten(cell):
    """Blocks poisoned with NaN go back to the pool; the next training call takes them and
    must match the per-step reference exactly as on fresh memory, with lengths (padded
    rows) and in both directions."""
    T, B, I, H = SIZE
    inp = make_inputs(cell, T, B, I, H)
    args = (cell, inp["x"].detach(), inp["h0"].detach()[None],
            None if inp["c0"] is None else inp["c0"].detach()[None],
            inp["w_ih"].detach()[None], inp["w_hh"].detach()[None],
            inp["b_ih"].detach()[None], inp["b_hh"].detach()[None], None, None, False, True)
    with torch.no_grad():
        outs = ops.forward(*args)
    poisoned = [t for t in (outs[0],) + tuple(outs[3:6]) if t.numel() > 0]  # y, saved
    for t in poisoned:
        assert t.nbytes >= MIN_BYTES
        t.fill_(float("nan"))
    expected = sum(t.nbytes for t in poisoned)
    ptrs = {t.data_ptr() for t in poisoned}
    del t, outs, poisoned
    assert ops._C.saved_memory_cached() == expected
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(3))
    lengths[0] = T
    for reverse in (False, True):
        before = ops._C.saved_memory_cached()
        out = call(F, cell, inp, lengths, reverse)
        # y and the saved tensors took poisoned blocks (the pool may then hold blocks of
        # other sizes: the input projection's rows with lengths, weight gradients).
        assert out[0].data_ptr() in ptrs
        assert ops._C.saved_memory_cached() < before
        ref = call(R, cell, inp, lengths, reverse)
        for a, e in zip(out, ref):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=0)
        ga, ge = grads(out, inp), grads(ref, inp)
        for k in ga:
            torch.testing.assert_close(ga[k], ge[k], atol=1e-10, rtol=0)
        del out, ga
        assert ops._C.saved_memory_cached() >= expected  # back once the graph is gone


def test_module_training_steps_reuse_the_same_blocks():
    """From the second step on, a training step takes every large block from the pool and
    gives it back: the pool neither grows nor shrinks, and the gradients stay the same."""
    torch.manual_seed(0)
    m = fastrnn.LSTM(16, 64, num_layers=2).double()
    x = torch.randn(50, 64, 16, dtype=torch.float64)
    grads_per_step, cached = [], []
    for _ in range(4):
        m.zero_grad()
        y, _ = m(x)
        y.square().sum().backward()
        grads_per_step.append([p.grad.clone() for p in m.parameters()])
        cached.append(ops._C.saved_memory_cached())
    assert cached[0] >= 2 * (4 + 2) * 50 * 64 * 64 * 8  # each layer's gates, hprev, cprev
    assert cached[1] == cached[2] == cached[3]
    for later in grads_per_step[1:]:
        for a, b in zip(grads_per_step[0], later):
            assert torch.equal(a, b)
    fastrnn.empty_cache()
    assert ops._C.saved_memory_cached() == 0


def test_calls_of_changing_sizes_keep_at_most_one_working_set():
    """Outputs of ever-larger calls cannot reuse each other's blocks: the pool keeps no
    more than the most its tensors held at once (here one output), not all of them."""
    m = fastrnn.GRU(8, 176).double()
    sizes = []
    with torch.no_grad():
        for T in range(10, 101, 10):
            y, _ = m(torch.randn(T, 64, 8, dtype=torch.float64))
            assert y.nbytes >= MIN_BYTES
            sizes.append(y.nbytes)
            del y
    assert 0 < ops._C.saved_memory_cached() <= max(sizes) < sum(sizes)


def test_empty_cache_frees_the_scratch_memory():
    """A call's large temporaries stay for the next call until empty_cache(); the calls
    after it allocate afresh and give the same result."""
    torch.manual_seed(0)
    m = fastrnn.GRU(16, 64)
    x = torch.randn(50, 64, 16, requires_grad=True)

    def step():
        y, _ = m(x)
        return torch.autograd.grad(y.square().sum(), [x, *m.parameters()])

    first = step()
    assert ops._C.scratch_bytes() >= 50 * 64 * 3 * 64 * 4  # gx, dgx, dgh of this layer
    fastrnn.empty_cache()
    assert ops._C.scratch_bytes() == 0
    for a, b in zip(first, step()):
        assert torch.equal(a, b)
    assert ops._C.scratch_bytes() > 0


def test_saved_tensors_are_ordinary_tensors():
    """A pooled tensor resizes, and its new memory also returns to the pool."""
    inp = make_inputs("gru", *SIZE)
    with torch.no_grad():
        gates = ops.forward("gru", inp["x"].detach(), inp["h0"].detach()[None], None,
                            inp["w_ih"].detach()[None], inp["w_hh"].detach()[None], None, None,
                            None, None, False, True)[3]
    assert gates.nbytes >= MIN_BYTES
    gates.resize_(gates.numel() * 2)
    gates[-1] = 1.0
    del gates
    assert ops._C.saved_memory_cached() >= 2 * MIN_BYTES
