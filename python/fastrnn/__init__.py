"""fastrnn: fused LSTM/GRU/RNN kernels for PyTorch, as drop-in torch.nn modules, and
LayerNorm LSTM/GRU layers."""
from . import functional, reference
from .modules import GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormLSTM, LSTMCell, RNNCell
from .convert import convert, to_torch
from .onnx import _register_when_onnxscript_loads

# torch.onnx.export then turns fastrnn layers into ONNX LSTM/GRU/RNN nodes (see onnx.py).
_register_when_onnxscript_loads()

__all__ = [
    "functional", "reference",
    "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU",
    "convert", "to_torch", "cpu_capabilities", "empty_cache",
]


def cpu_capabilities():
    """What the CPU kernels run on this machine, as a dict:

    - ``kernels``: the instruction set of the kernels in use ("avx512", "avx2" or
      "portable"), chosen from the CPU's feature flags, never its vendor;
    - ``supported_kernels``: those this build has and this CPU runs, best first;
    - ``features``: the CPUID flags that matter ("fma", "avx2", "avx512f", "avx512_bf16",
      "amx_bf16");
    - ``bfloat16`` / ``float16``: how models in that dtype run: through the float32
      kernels, the inputs cast up exactly and y, h_n, c_n cast back ("float32"), a
      bfloat16 model's large GEMMs with bfloat16 operands where the CPU has bf16 dot
      products ("bfloat16 GEMMs"; LSTM, GRU and RNN layers, the LayerNorm layers' stay
      float32);
    - ``autocast_bfloat16``: how a layer runs under ``torch.autocast("cpu", torch.bfloat16)``.
      "bfloat16 GEMMs": the large GEMMs (input projection, dx, weight gradients; from
      2^24 multiply-adds) take bfloat16 operands (oneDNN, through torch), on a CPU with
      AVX512_BF16 or AMX-BF16; the state and the gate math stay float32, and the recurrent
      products follow the keys below. Elsewhere "float32", as for float16 autocast.
    - ``bfloat16_recurrent_step``: whether, on those bfloat16 paths, the recurrent product
      h W_hh^T of small batches (the kernels' narrow tiles: at most 3 rows for LSTM and
      RNN, 2 for GRU) with a W_hh of 512 KiB or more in float32 also takes bfloat16
      operands (W_hh and the h fed to it rounded once, float32 sums; cells without
      LayerNorm): on a CPU with AVX512_BF16 running the avx512 kernels. Such a step streams
      half the bytes of W_hh. Larger batches keep a float32 step where it is bound by
      multiply-adds that bf16 dot products do not speed up (unless one of the next two
      keys holds). For an even hidden size the backward's recurrent product (gate
      gradients times W_hh) follows the same rules;
    - ``bfloat16_recurrent_step_all_batches``: whether larger batches take that bfloat16
      step too, because this CPU's bf16 dot products do at least 1.5 times the multiply-adds
      per second of its float32 FMAs (measured once per process, at the first such step;
      AMD Zen 4: about twice, an LSTM step at B=16..64 1.3-1.5x faster);
    - ``bfloat16_recurrent_step_amx``: whether batches past the narrow tiles take the
      bfloat16 step on AMX tiles, forward and backward, for a W_hh of 64 KiB or more in
      float32 (the CPU has AMX-BF16 and the OS grants the process its tile state; Intel
      Xeon 4th generation and later): a tile instruction does 16 times the multiply-adds
      of a bf16 dot product vector instruction.
    """
    from . import _C, ops

    step = ops._BF16_DOT and _C.cpu_kernels() == "avx512" and "avx512_bf16" in _C.cpu_features()
    return {"kernels": _C.cpu_kernels(), "supported_kernels": list(_C.supported_cpu_kernels()),
            "features": list(_C.cpu_features()),
            "bfloat16": "bfloat16 GEMMs" if ops._BF16_DOT else "float32", "float16": "float32",
            "autocast_bfloat16": "bfloat16 GEMMs" if ops._BF16_DOT else "float32",
            "bfloat16_recurrent_step": step,
            "bfloat16_recurrent_step_all_batches": step and _C.bf16_step_wide(),
            "bfloat16_recurrent_step_amx": bool(ops._BF16_DOT and _C.bf16_step_amx())}


def empty_cache():
    """Free the memory fastrnn keeps for reuse on the CPU, as ``torch.cuda.empty_cache()``
    does for CUDA's caching allocator.

    A training forward on the CPU saves large tensors for its backward (the gates, the
    states entering each step), and every call hands out outputs and weight gradients.
    When they die, fastrnn keeps their blocks (256 KiB and up; 1 GiB in all at most, and
    never more than those tensors held at once) and hands them to the next call, which
    asks for the same sizes: fresh memory of that size would come from the OS as
    zero-filled pages faulted in one by one on every step. The large temporaries of a
    call (the input projection, the gate gradients, the bfloat16 copies of autocast's
    GEMMs) are kept the same way, per calling thread. This gives those blocks back to the
    OS (the temporaries of the calling thread), e.g. when training is over. Tensors still
    alive keep theirs until they die.
    """
    from . import _C

    _C.release_saved_memory()
    _C.release_scratch()
