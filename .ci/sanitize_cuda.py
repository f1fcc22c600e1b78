"""A small forward + backward of every cell on the GPU, for compute-sanitizer:
lengths on the device, one and two directions, with and without a projection, float32 and
bfloat16, through the modules (multi-layer) and the cells; the per-step path and the
persistent kernels; the LayerNorm modules with resets and zoneout. Exits non-zero on a
mismatch with the CPU in float64, so a run under the sanitizer also checks the answers.

    compute-sanitizer --tool memcheck  python .ci/sanitize_cuda.py
    compute-sanitizer --tool racecheck python .ci/sanitize_cuda.py
"""
import sys

import torch

import fastrnn

T, B, I, H = 6, 3, 5, 7


def case(kind, bidirectional, proj, dtype, lengths):
    torch.manual_seed(0)
    extra = {"proj_size": 4} if proj else {}
    if kind in ("rnn_tanh", "rnn_relu"):
        cls, extra = fastrnn.RNN, {"nonlinearity": kind[4:]}
    else:
        cls = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[kind]
    ref = cls(I, H, num_layers=2, bidirectional=bidirectional, **extra).double()
    gpu = cls(I, H, num_layers=2, bidirectional=bidirectional, **extra).cuda().to(dtype)
    gpu.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    xg = x.detach().cuda().to(dtype).requires_grad_()
    lens = torch.tensor([T, 2, 5][:B]) if lengths else None
    out, _ = ref(x, lengths=lens)
    outg, _ = gpu(xg, lengths=None if lens is None else lens.cuda())
    out.sum().backward()
    outg.float().sum().backward()
    torch.cuda.synchronize()
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    err = (outg.double().cpu() - out).abs().max().item()
    gerr = (xg.grad.double().cpu() - x.grad).abs().max().item()
    ok = err < tol and gerr < tol * 10
    print(f"{kind:9s} D={1 + bidirectional} proj={proj:d} {str(dtype)[6:]:9s} "
          f"lengths={lengths:d}  out {err:.1e} dx {gerr:.1e} {'ok' if ok else 'MISMATCH'}")
    return ok


def cells():
    ok = True
    for name in ("LSTMCell", "GRUCell", "RNNCell"):
        torch.manual_seed(0)
        ref = getattr(fastrnn, name)(I, H).double()
        gpu = getattr(fastrnn, name)(I, H).cuda()
        gpu.load_state_dict(ref.state_dict())
        x = torch.randn(B, I, dtype=torch.float64)
        a = ref(x)
        b = gpu(x.float().cuda())
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        err = (b.double().cpu() - a).abs().max().item()
        print(f"{name:9s} out {err:.1e}")
        ok &= err < 1e-4
    return ok


def layer_norm(kind, bidirectional, dtype, lengths):
    """fastrnn.LayerNormLSTM/GRU, two layers, with resets and zoneout (eval mode: the same
    mix on both devices); H spans two warps, so each row's block reduces across warps."""
    torch.manual_seed(0)
    Hn = 40
    cls = {"lstm": fastrnn.LayerNormLSTM, "gru": fastrnn.LayerNormGRU}[kind]
    ref = cls(I, Hn, num_layers=2, bidirectional=bidirectional, zoneout=0.2).double().eval()
    gpu = cls(I, Hn, num_layers=2, bidirectional=bidirectional, zoneout=0.2).cuda().to(dtype)
    gpu.load_state_dict(ref.state_dict())
    gpu.eval()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    xg = x.detach().cuda().to(dtype).requires_grad_()
    lens = torch.tensor([T, 2, 5][:B]) if lengths else None
    resets = torch.rand(T, B) < 0.3
    out, _ = ref(x, lengths=lens, resets=resets)
    outg, _ = gpu(xg, lengths=None if lens is None else lens.cuda(), resets=resets.cuda())
    out.sum().backward()
    outg.float().sum().backward()
    torch.cuda.synchronize()
    # Relative to each result's scale: dx sums over 2 * Hn outputs and reaches about 10.
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    err = (outg.double().cpu() - out).abs().max().item() / max(1.0, out.abs().max().item())
    gerr = (xg.grad.double().cpu() - x.grad).abs().max().item() / x.grad.abs().max().item()
    ok = err < tol and gerr < tol
    print(f"ln_{kind:6s} D={1 + bidirectional} {str(dtype)[6:]:9s} lengths={lengths:d}  "
          f"out {err:.1e} dx {gerr:.1e} {'ok' if ok else 'MISMATCH'}")
    return ok


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    for persistent in (False, True):
        fastrnn.ops._C.set_cuda_persistent(persistent)
        print("persistent kernels:", persistent)
        for kind in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
            for bidirectional in (False, True):
                for proj in ((False, True) if kind == "lstm" else (False,)):
                    for dtype in (torch.float32, torch.bfloat16):
                        for lengths in (False, True):
                            ok &= case(kind, bidirectional, proj, dtype, lengths)
    fastrnn.ops._C.set_cuda_persistent(False)
    ok &= cells()
    for kind in ("lstm", "gru"):
        for bidirectional in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                for lengths in (False, True):
                    ok &= layer_norm(kind, bidirectional, dtype, lengths)
    print("sanitize_cuda:", "all cases match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
