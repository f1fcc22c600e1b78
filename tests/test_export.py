"""Deployment: torch.export, ONNX (run by onnxruntime) and AOTInductor packages.

Guarantees checked here (CPU, float32):
- torch.export.export of every fastrnn module, and of a fastrnn.convert-ed model, with
  static shapes and with dynamic batch and sequence length; the program matches eager.
- torch.export.save / load round-trips in a fresh process that imports fastrnn; without
  the import, loading fails with an error naming the fastrnn op.
- torch.onnx.export(..., dynamo=True) turns each layer into one standard ONNX LSTM/GRU/RNN
  node (no custom_translation_table); the ONNX checker passes and onnxruntime matches
  eager fastrnn within 1e-5 for every cell and option; proj_size fails at export with an
  error naming it.
- An AOTInductor package of a model with fastrnn layers loads and matches eager.
"""
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

import fastrnn

DYN = torch.export.Dim.DYNAMIC
ONNX_ATOL = 1e-5


def fresh_lengths(T, B, g):
    # Random lengths in [0, T], one full-length and one empty sequence among them.
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = T, 0
    return lengths


def assert_close_to_eager(got, want, **tol):
    got, want = tree_leaves(got), tree_leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.as_tensor(a), b.detach(), **tol)


# --------------------------------------------------------------------------- torch.export

class Converted(nn.Module):
    """A torch.nn model with every recurrent module and cell, for fastrnn.convert."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 5)
        self.rnn = nn.RNN(5, 3, nonlinearity="relu")
        self.lstm_cell = nn.LSTMCell(3, 4)
        self.gru_cell = nn.GRUCell(4, 4)
        self.rnn_cell = nn.RNNCell(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x [B, T, 4]
        y, _ = self.lstm(x)
        y, _ = self.gru(y.transpose(0, 1))
        y, h = self.rnn(y)
        state = self.lstm_cell(y[0])
        state = self.lstm_cell(y[-1], state)
        return self.head(self.rnn_cell(self.gru_cell(state[0]))), h


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


# name -> (module, inputs(T, B, g), dynamic_shapes). Inputs are positional; a third one
# is lengths= (see WithLengths). Each case is exported at T=5, B=3.
CASES = {
    "lstm_2layer_bidir_batch_first_state_lengths": (
        lambda: fastrnn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True),
        lambda T, B, g: (randn(g, B, T, 4), (randn(g, 4, B, 6), randn(g, 4, B, 6)),
                         fresh_lengths(T, B, g)),
        ({0: DYN, 1: DYN}, ({1: DYN}, {1: DYN}), {0: DYN})),
    "lstm_proj_size": (
        lambda: fastrnn.LSTM(4, 6, proj_size=3, num_layers=2),
        lambda T, B, g: (randn(g, T, B, 4),),
        ({0: DYN, 1: DYN},)),
    "gru_bidir_lengths": (
        lambda: fastrnn.GRU(4, 6, bidirectional=True),
        lambda T, B, g: (randn(g, T, B, 4), None, fresh_lengths(T, B, g)),
        ({0: DYN, 1: DYN}, None, {0: DYN})),
    "rnn_tanh_2layer_state": (
        lambda: fastrnn.RNN(4, 6, num_layers=2, batch_first=True),
        lambda T, B, g: (randn(g, B, T, 4), randn(g, 2, B, 6)),
        ({0: DYN, 1: DYN}, {1: DYN})),
    "rnn_relu_no_bias": (
        lambda: fastrnn.RNN(4, 6, nonlinearity="relu", bias=False),
        lambda T, B, g: (randn(g, T, B, 4),),
        ({0: DYN, 1: DYN},)),
    "gru_unbatched": (
        lambda: fastrnn.GRU(4, 6),
        lambda T, B, g: (randn(g, T, 4),),
        ({0: DYN},)),
    "lstm_cell": (
        lambda: fastrnn.LSTMCell(4, 6),
        lambda T, B, g: (randn(g, B, 4), (randn(g, B, 6), randn(g, B, 6))),
        ({0: DYN}, ({0: DYN}, {0: DYN}))),
    "gru_cell": (
        lambda: fastrnn.GRUCell(4, 6),
        lambda T, B, g: (randn(g, B, 4), randn(g, B, 6)),
        ({0: DYN}, {0: DYN})),
    "rnn_cell_relu": (
        lambda: fastrnn.RNNCell(4, 6, nonlinearity="relu"),
        lambda T, B, g: (randn(g, B, 4),),
        ({0: DYN},)),
    "layernorm_lstm_bidirectional": (
        lambda: fastrnn.LayerNormLSTM(4, 6, num_layers=2, bidirectional=True),
        lambda T, B, g: (randn(g, T, B, 4), None, fresh_lengths(T, B, g)),
        ({0: DYN, 1: DYN}, None, {0: DYN})),
    "layernorm_gru_batch_first": (
        lambda: fastrnn.LayerNormGRU(4, 6, batch_first=True),
        lambda T, B, g: (randn(g, B, T, 4),),
        ({0: DYN, 1: DYN},)),
    "converted_model": (
        lambda: fastrnn.convert(Converted()),
        lambda T, B, g: (randn(g, B, T, 4),),
        ({0: DYN, 1: DYN},)),
}


class WithLengths(nn.Module):
    """Passes a third positional input on as lengths=."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None, lengths=None):
        return self.rnn(x, hx, lengths=lengths)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_matches_eager(name, dynamic):
    make_module, make_inputs, dynamic_shapes = CASES[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    inputs = make_inputs(5, 3, g)
    model = WithLengths(make_module()) if len(inputs) == 3 else make_module()
    ep = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes if dynamic else None)
    fused = (torch.ops.fastrnn.forward.default, torch.ops.fastrnn.ln_forward.default)
    assert any(n.target in fused for n in ep.graph.nodes)
    exported = ep.module()
    # Fresh data at the traced shape; with dynamic shapes, also at new lengths and batches.
    for T, B in [(5, 3)] + ([(8, 2), (2, 6)] if dynamic else []):
        inputs = make_inputs(T, B, g)
        assert_close_to_eager(exported(*inputs), model(*inputs))


# --------------------------------------------------------------------------- ONNX

CELLS = {"lstm": (fastrnn.LSTM, {}), "gru": (fastrnn.GRU, {}),
         "rnn_tanh": (fastrnn.RNN, {"nonlinearity": "tanh"}),
         "rnn_relu": (fastrnn.RNN, {"nonlinearity": "relu"})}
ONNX_NODE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}

# Six configurations in which every pair of options meets in every combination of
# values (a pairwise covering array over six yes/no options), for each cell.
OPTIONS = ("two_layers", "bidirectional", "batch_first", "lengths", "h0", "bias")
CONFIGS = [(0, 0, 0, 0, 0, 0),
           (1, 1, 0, 0, 1, 0),
           (1, 0, 1, 0, 1, 1),
           (1, 0, 0, 1, 0, 1),
           (0, 1, 1, 1, 1, 0),
           (0, 1, 1, 1, 0, 1)]


def config_id(config):
    return "-".join(name for name, on in zip(OPTIONS, config) if on) or "plain"


def onnxruntime_run(model_proto, inputs):
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    tensors = [t for t in tree_leaves(inputs) if t is not None]  # in the graph's input order
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors, strict=True)}
    return session.run(None, feeds)


def export_onnx(model, inputs, **kwargs):
    program = torch.onnx.export(model, inputs, dynamo=True, verbose=False, **kwargs)
    onnx.checker.check_model(program.model_proto, full_check=True)
    return program.model_proto


@pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
@pytest.mark.parametrize("cell", list(CELLS))
def test_onnx_standard_nodes_match_eager(cell, config):
    two_layers, bidirectional, batch_first, use_lengths, use_h0, bias = map(bool, config)
    cls, kwargs = CELLS[cell]
    layers, D, H = 1 + two_layers, 1 + bidirectional, 5
    torch.manual_seed(0)
    model = WithLengths(cls(3, H, num_layers=layers, bidirectional=bidirectional,
                            batch_first=batch_first, bias=bias, **kwargs)).eval()
    g = torch.Generator().manual_seed(1)

    def inputs(T, B):
        x = randn(g, B, T, 3) if batch_first else randn(g, T, B, 3)
        h0 = None
        if use_h0:
            h0 = randn(g, layers * D, B, H)
            h0 = (h0, randn(g, layers * D, B, H)) if cell == "lstm" else h0
        return x, h0, fresh_lengths(T, B, g) if use_lengths else None

    # Exported with dynamic batch and sequence length, run at other sizes.
    b, t = (0, 1) if batch_first else (1, 0)
    h_dyn = {1: DYN}
    dynamic_shapes = ({b: DYN, t: DYN},
                      ((h_dyn, h_dyn) if cell == "lstm" else h_dyn) if use_h0 else None,
                      {0: DYN} if use_lengths else None)
    proto = export_onnx(model, inputs(5, 3), dynamic_shapes=dynamic_shapes)

    nodes = [n for n in proto.graph.node if n.op_type in ("LSTM", "GRU", "RNN", "Loop", "Scan")]
    assert [n.op_type for n in nodes] == [ONNX_NODE[cell]] * layers
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["direction"] == (b"bidirectional" if bidirectional else b"forward")
        assert attrs.get("layout", 0) == 0
        assert attrs["hidden_size"] == H
        if cell == "gru":
            assert attrs["linear_before_reset"] == 1
        if cell.startswith("rnn"):
            assert attrs["activations"] == [cell[4:].capitalize().encode()] * D
        has_lengths = len(node.input) > 4 and node.input[4] != ""
        assert has_lengths == use_lengths

    for T, B in [(6, 4), (2, 1)]:
        x = inputs(T, B)
        with torch.no_grad():
            want = model(*x)
        got = onnxruntime_run(proto, x)
        assert_close_to_eager(got, want, atol=ONNX_ATOL, rtol=0)


def test_onnx_converted_model_and_cells_from_exported_program():
    """A converted torch.nn model (every recurrent module and cell), exported first with
    torch.export and then given to the ONNX exporter as an ExportedProgram."""
    torch.manual_seed(0)
    model = fastrnn.convert(Converted()).eval()
    g = torch.Generator().manual_seed(1)
    ep = torch.export.export(model, (randn(g, 3, 5, 4),), dynamic_shapes=({0: DYN, 1: DYN},))
    proto = export_onnx(ep, ())
    ops = [n.op_type for n in proto.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    # Two LSTM layers and two LSTMCell steps, GRU and GRUCell, RNN and RNNCell.
    assert sorted(ops) == ["GRU"] * 2 + ["LSTM"] * 4 + ["RNN"] * 2
    for T, B in [(7, 2), (3, 5)]:
        x = randn(g, B, T, 4)
        with torch.no_grad():
            want = model(x)
        assert_close_to_eager(onnxruntime_run(proto, (x,)), want, atol=ONNX_ATOL, rtol=0)


class ReversedPair(nn.Module):
    """fastrnn.functional.layer with two directions and reverse=True: direction 0 runs
    reversed and direction 1 forward, the opposite of ONNX's bidirectional node.
    Optionally without the input bias b_ih (the recurrent bias b_hh is kept)."""

    def __init__(self, cell, input_bias, I=3, H=4):
        super().__init__()
        G = {"lstm": 4, "gru": 3}[cell]
        self.cell, self.input_bias = cell, input_bias
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(*shape) * 0.5)
             for _ in range(2) for shape in ((G * H, I), (G * H, H), (G * H,), (G * H,))])

    def forward(self, x, h0, lengths, c0=None):
        w = list(self.weights)
        per_direction = [(w_ih, w_hh, b_ih if self.input_bias else None, b_hh, None)
                         for w_ih, w_hh, b_ih, b_hh in (w[:4], w[4:])]
        y, h_n, c_n = fastrnn.functional.layer(self.cell, x, h0, c0, per_direction, lengths,
                                               reverse=True)
        return (y, h_n) if c_n is None else (y, h_n, c_n)


@pytest.mark.parametrize("cell, input_bias", [("lstm", True), ("gru", False)])
def test_onnx_functional_layer_reverse_two_directions(cell, input_bias):
    torch.manual_seed(0)
    model = ReversedPair(cell, input_bias).eval()
    g = torch.Generator().manual_seed(1)
    T, B = 6, 3
    inputs = (randn(g, T, B, 3), randn(g, 2, B, 4), fresh_lengths(T, B, g))
    inputs += (randn(g, 2, B, 4),) if cell == "lstm" else ()
    proto = export_onnx(model, inputs)
    with torch.no_grad():
        want = model(*inputs)
    assert_close_to_eager(onnxruntime_run(proto, inputs), want, atol=ONNX_ATOL, rtol=0)


def test_onnx_proj_size_is_refused_by_name():
    model = fastrnn.LSTM(3, 5, proj_size=2).eval()
    with pytest.raises(torch.onnx.OnnxExporterError, match="proj_size"):
        torch.onnx.export(model, (torch.randn(4, 2, 3),), dynamo=True, verbose=False)


@pytest.mark.parametrize("model, kwargs, name", [
    (lambda: fastrnn.GRU(3, 5, zoneout=0.2), {}, "zoneout"),
    (lambda: fastrnn.LSTM(3, 5), {"resets": torch.rand(4, 2) < 0.5}, "resets="),
    (lambda: fastrnn.LayerNormGRU(3, 5), {}, "LayerNormLSTM/LayerNormGRU"),
])
def test_onnx_extensions_are_refused_by_name(model, kwargs, name):
    model = model().eval()
    with pytest.raises(torch.onnx.OnnxExporterError, match=name):
        torch.onnx.export(model, (torch.randn(4, 2, 3),), kwargs=kwargs, dynamo=True,
                          verbose=False)


def run_python(script, check=True):
    """Runs ``script`` in a fresh interpreter; returns its stdout and stderr together."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("first", ["fastrnn", "onnxscript"])
def test_onnx_registration_needs_no_setup(first):
    """In a fresh process, the plain exporter knows fastrnn's op whichever of fastrnn and
    onnxscript is imported first, and import fastrnn alone does not import onnxscript."""
    script = f"""
        import sys
        import torch
        import {first}
        import fastrnn
        if {first!r} == "fastrnn":
            assert "onnxscript" not in sys.modules, "import fastrnn imported onnxscript"
        model = fastrnn.GRU(3, 4, bidirectional=True).eval()
        program = torch.onnx.export(model, (torch.randn(5, 2, 3),), dynamo=True, verbose=False)
        print(sorted(n.op_type for n in program.model_proto.graph.node))
    """
    out = run_python(script)
    assert "'GRU'" in out, out


# ------------------------------------------------- saved programs, AOTInductor packages

class Deployed(nn.Module):
    """Padded batch-first input with lengths -> 2-layer bidirectional LSTM -> GRU -> linear."""

    def __init__(self):
        super().__init__()
        self.lstm = fastrnn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = fastrnn.GRU(16, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x, lengths):
        y, _ = self.lstm(x, lengths=lengths)
        y, h = self.gru(y, lengths=lengths)
        return self.head(y), h


def deployed_inputs(T, B, g):
    return randn(g, B, T, 4), fresh_lengths(T, B, g)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The Deployed model exported with dynamic batch and time, saved by torch.export.save
    and packaged by AOTInductor; with fresh inputs at other sizes and eager's outputs."""
    path = tmp_path_factory.mktemp("deployed")
    torch.manual_seed(0)
    model = Deployed().eval()
    g = torch.Generator().manual_seed(1)
    # no_grad: the program keeps nothing for a backward pass.
    with torch.no_grad():
        ep = torch.export.export(model, deployed_inputs(5, 3, g),
                                 dynamic_shapes=({0: DYN, 1: DYN}, {0: DYN}))
        torch.export.save(ep, path / "program.pt2")
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path / "package.pt2"))
        cases = [deployed_inputs(T, B, g) for T, B in [(7, 2), (3, 5)]]
        torch.save([(inputs, model(*inputs)) for inputs in cases], path / "cases.pt")
    return path


def test_aoti_package_matches_eager(deployed):
    package = torch._inductor.aoti_load_package(str(deployed / "package.pt2"))
    for inputs, want in torch.load(deployed / "cases.pt"):
        assert_close_to_eager(package(*inputs), want)


def test_saved_programs_load_in_a_fresh_process(deployed):
    """torch.export.load and aoti_load_package in a new interpreter that imports fastrnn
    (which registers the op) match eager; without the import, both fail naming the op."""
    program, package = str(deployed / "program.pt2"), str(deployed / "package.pt2")
    out = run_python(f"""
        import torch
        import fastrnn
        cases = torch.load({str(deployed / "cases.pt")!r})
        program = torch.export.load({program!r}).module()
        package = torch._inductor.aoti_load_package({package!r})
        for inputs, want in cases:
            for run in (program, package):
                for got, w in zip(run(*inputs), want):
                    torch.testing.assert_close(got, w)
        print("matched")
    """)
    assert "matched" in out

    # torch.export.load logs this reason, then raises a RuntimeError.
    out = run_python(f"import torch; torch.export.load({program!r})", check=False)
    assert "RuntimeError" in out and "failed to resolve torch.ops.fastrnn.forward" in out, out
    assert "import the custom op" in out, out
    out = run_python(f"import torch; torch._inductor.aoti_load_package({package!r})",
                     check=False)
    assert "RuntimeError: Could not find schema for fastrnn::forward" in out, out


# Runs an AOTInductor package with no Python interpreter: inputs and outputs as raw files.
CPP_RUNNER = r"""
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <fstream>
#include <string>

int main(int argc, char** argv) {  // package x.bin lengths.bin B T out.bin
  int64_t B = std::stoll(argv[4]), T = std::stoll(argv[5]);
  at::Tensor x = at::empty({B, T, 4}, at::kFloat), lengths = at::empty({B}, at::kLong);
  std::ifstream(argv[2], std::ios::binary).read((char*)x.data_ptr(), x.nbytes());
  std::ifstream(argv[3], std::ios::binary).read((char*)lengths.data_ptr(), lengths.nbytes());
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::ofstream out(argv[6], std::ios::binary);
  for (const at::Tensor& y : loader.run({x, lengths}))
    out.write((const char*)y.contiguous().data_ptr(), y.nbytes());
}
"""


def test_aoti_package_runs_from_cpp(deployed, tmp_path):
    """The link line the README gives: libtorch, fastrnn's library (which registers the
    ops when loaded) and libpython (that library's Python symbols); no interpreter runs."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this Python has no shared libpython to link fastrnn's library with")
    torch_dir = Path(torch.__file__).parent
    fastrnn_lib = Path(fastrnn._C.__file__)
    pylib = sysconfig.get_config_var("LIBDIR")
    (tmp_path / "main.cpp").write_text(CPP_RUNNER)
    build = subprocess.run(
        [shutil.which("c++") or "g++", "-std=c++17", "main.cpp", "-o", "serve",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
         f"-I{torch_dir}/include", f"-I{torch_dir}/include/torch/csrc/api/include",
         f"-L{torch_dir}/lib", f"-L{pylib}", "-Wl,--no-as-needed", str(fastrnn_lib),
         "-ltorch", "-ltorch_cpu", "-lc10", f"-lpython{sysconfig.get_python_version()}",
         f"-Wl,-rpath,{torch_dir}/lib", f"-Wl,-rpath,{pylib}",
         f"-Wl,-rpath,{fastrnn_lib.parent}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    for (x, lengths), want in torch.load(deployed / "cases.pt"):
        x.numpy().tofile(tmp_path / "x.bin")
        lengths.numpy().tofile(tmp_path / "lengths.bin")
        B, T = x.shape[:2]
        subprocess.run([tmp_path / "serve", deployed / "package.pt2", "x.bin", "lengths.bin",
                        str(B), str(T), "out.bin"], cwd=tmp_path, check=True, timeout=300)
        got = torch.from_file(str(tmp_path / "out.bin"), size=sum(w.numel() for w in want))
        assert_close_to_eager(got.split([w.numel() for w in want]),
                              [w.reshape(-1) for w in want])
