"""Tests for the Triton flash-attention kernel (``dream.kernels``).

CPU runs go through the Triton interpreter (``TRITON_INTERPRET=1``, set in ``conftest.py``) at tiny shapes.
GPU tests (marker ``gpu``) repeat the parity checks at DREAM shapes; run them on a CUDA machine with
``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels.py`` (under the interpreter they would take hours).

Tolerance: the flash-attention "2x rule". With a float64 reference (``attention_ref`` on float64 inputs),
our error must be at most twice the error of PyTorch's own attention math run in the same dtype
(``attention_ref(..., upcast=False)``), plus the rounding error of the reference in that dtype. This holds
for the output and for dq, dk, dv.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dream.ops.attention import attention, attention_ref

kernels = pytest.importorskip("dream.kernels")

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernels = pytest.mark.skipif(not kernels.is_available(), reason=f"kernels: {kernels.unavailable_reason()}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                               reason="needs CUDA with TRITON_INTERPRET=0")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _make_mask(kind: str, bsz: int, nk: int, device, generator: torch.Generator):
    """(B, Nk) bool, True = padded; every row keeps key 0 so no query row is empty (empty rows have their own
    test)."""
    if kind == "none":
        return None
    if kind == "tail":  # encoder-style ragged batch: element b keeps nk - 3 * b - 2 keys
        keep = torch.tensor([max(1, nk - 3 * b - 2) for b in range(bsz)], device=device)
        return torch.arange(nk, device=device)[None, :] >= keep[:, None]
    if kind == "random":
        m = torch.rand(bsz, nk, generator=generator) < 0.4
        m[:, 0] = False
        return m.to(device)
    raise ValueError(kind)


def _inputs(bsz, heads, nq, nk, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bsz, heads, n, head_dim, generator=g).to(device=device, dtype=dtype)
               for n in (nq, nk, nk))
    do = torch.randn(bsz, heads, nq, head_dim, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do, g


def _fwd_bwd(fn, q, k, v, do, **kw):
    """out and (dq, dk, dv) of ``fn`` at leaf copies of q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do.to(out.dtype))
    return out.detach(), (q.grad, k.grad, v.grad)


def _check_2x(name, ours, ref, torch_same, dtype):
    ours, ref, torch_same = ours.double(), ref.double(), torch_same.double()
    atol = 2 * (ref.to(dtype).double() - ref).abs().max().item()  # rounding of the reference in this dtype
    err = (ours - ref).abs().max().item()
    base = (torch_same - ref).abs().max().item()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    assert err <= 2 * base + atol, f"{name}: max error {err:.3e} > 2 * torch {dtype} error {base:.3e} + {atol:.3e}"


def _run_parity(bsz, heads, nq, nk, head_dim, dtype, causal, mask_kind, device, scale=None):
    q, k, v, do, g = _inputs(bsz, heads, nq, nk, head_dim, dtype, device)
    mask = _make_mask(mask_kind, bsz, nk, device, g)
    kw = dict(key_padding_mask=mask, scale=scale)
    ours = _fwd_bwd(lambda a, b, c, **x: kernels.flash_attention(a, b, c, causal=causal, **x), q, k, v, do, **kw)
    ref = _fwd_bwd(lambda a, b, c, **x: attention_ref(a, b, c, is_causal=causal, upcast=False, **x),
                   q.double(), k.double(), v.double(), do.double(), **kw)
    same = _fwd_bwd(lambda a, b, c, **x: attention_ref(a, b, c, is_causal=causal, upcast=False, **x),
                    q, k, v, do, **kw)
    assert ours[0].dtype == dtype and ours[0].shape == (bsz, heads, nq, head_dim)
    _check_2x("out", ours[0], ref[0], same[0], dtype)
    for name, a, r, s in zip(("dq", "dk", "dv"), ours[1], ref[1], same[1]):
        assert a.dtype == dtype and a.shape == r.shape
        _check_2x(name, a, r, s, dtype)


# ---------------------------------------------------------------------------------------------------------
# parity on CPU through the interpreter (tiny shapes)
# ---------------------------------------------------------------------------------------------------------

# (dtype, Nq, Nk, Dh, causal, mask): the interpreter blocks are 32 x 16 (fwd), so these cross block edges.
CPU_CASES = [
    (torch.float32, 37, 37, 32, False, "none"),
    (torch.float16, 37, 37, 64, False, "none"),
    (torch.float32, 64 + 37, 64 + 37, 32, False, "tail"),  # encoder: 64 buffer + ragged visible tokens
    (torch.float16, 64 + 13, 64 + 13, 32, False, "tail"),
    (torch.float32, 64, 23, 32, False, "random"),  # cross-attention, Nq != Nk
    (torch.float16, 23, 64, 64, False, "tail"),
    (torch.float32, 48, 48, 32, True, "none"),
    (torch.float16, 80, 80, 64, True, "tail"),
    (torch.float32, 40, 24, 32, True, "none"),  # causal with Nq != Nk: top-left aligned like SDPA
    (torch.float16, 33, 33, 40, False, "random"),  # head dim 40: padded to 64 inside the kernel
    (torch.bfloat16, 37, 23, 32, False, "tail"),  # bf16 via the interpreter's fp32-operand path
    (torch.bfloat16, 48, 48, 64, True, "none"),
]


@needs_kernels
@pytest.mark.parametrize("dtype,nq,nk,head_dim,causal,mask_kind", CPU_CASES,
                         ids=[f"{str(c[0])[6:]}-q{c[1]}-k{c[2]}-d{c[3]}-{'causal' if c[4] else 'full'}-{c[5]}"
                              for c in CPU_CASES])
def test_parity_interpreter(dtype, nq, nk, head_dim, causal, mask_kind):
    _run_parity(2 if mask_kind == "tail" else 1, 2, nq, nk, head_dim, dtype, causal, mask_kind, "cpu")


@needs_kernels
def test_custom_scale():
    _run_parity(1, 2, 37, 29, 32, torch.float32, False, "none", "cpu", scale=0.37)


@needs_kernels
def test_strided_inputs_match_contiguous():
    """q/k/v sliced out of a packed (B, N, 3, H, Dh) qkv tensor, as attention layers produce them."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 45, 3, 2, 32, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh), non-contiguous
    assert not q.is_contiguous()
    out = kernels.flash_attention(q, k, v)
    out_c = kernels.flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim not unit-stride
    torch.testing.assert_close(kernels.flash_attention(q, k_t, v), out_c, rtol=0, atol=0)


@needs_kernels
def test_lse_matches_logsumexp():
    q, k, v, _, g = _inputs(2, 2, 37, 29, 32, torch.float32, "cpu")
    mask = _make_mask("random", 2, 29, "cpu", g)
    out, lse = kernels.flash_attention(q, k, v, key_padding_mask=mask, causal=False, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) * 32 ** -0.5
    s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    assert lse.shape == (2, 2, 37) and not lse.requires_grad


@needs_kernels
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_rows_are_zero(causal):
    """Rows with no valid key output 0 with zero gradients (no NaN); other rows stay exact."""
    q, k, v, do, _ = _inputs(2, 2, 40, 40, 32, torch.float32, "cpu")
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1] = True  # batch element 1: every key padded
    mask[0, :5] = True  # element 0 with causal: query rows 0..4 see only padded keys
    out, (dq, dk, dv) = _fwd_bwd(lambda a, b, c: kernels.flash_attention(a, b, c, key_padding_mask=mask,
                                                                         causal=causal), q, k, v, do)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert out[1].abs().max() == 0 and dq[1].abs().max() == 0 and dk[1].abs().max() == 0
    assert dv[1].abs().max() == 0
    assert dk[0, :, :5].abs().max() == 0 and dv[0, :, :5].abs().max() == 0  # padded keys get no gradient
    empty_rows = 5 if causal else 0
    assert out[0, :, :empty_rows].count_nonzero() == 0 and dq[0, :, :empty_rows].count_nonzero() == 0
    ref = _fwd_bwd(lambda a, b, c: _ref_empty_rows_zero(a, b, c, mask, causal),
                   q.double(), k.double(), v.double(), do.double())
    for a, r in zip((out, dq, dk, dv), (ref[0],) + ref[1]):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def _ref_empty_rows_zero(q, k, v, mask, causal):
    """Plain PyTorch attention whose rows without any valid key are 0 (with zero gradients)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    invalid = mask[:, None, None, :]
    if causal:
        invalid = invalid | torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
    s = s.masked_fill(invalid, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp(min=-1e30).detach()  # finite shift even for empty rows
    e = torch.exp(s - m)
    return (e / e.sum(-1, keepdim=True).clamp_min(1e-300)) @ v


@needs_kernels
def test_empty_sequences():
    q = torch.randn(1, 2, 5, 32)
    kv = torch.randn(1, 2, 0, 32)
    assert kernels.flash_attention(q, kv, kv).abs().max() == 0  # no keys: every row is empty -> 0
    assert kernels.flash_attention(q[:, :, :0], q, q).shape == (1, 2, 0, 32)


# ---------------------------------------------------------------------------------------------------------
# dispatch, torch.library, torch.compile, errors
# ---------------------------------------------------------------------------------------------------------


@needs_kernels
def test_ops_attention_routes_to_kernel():
    """backend="triton" is the kernel (its accuracy against the reference is in tests/ops/test_attention_backends.py),
    and fully masked rows give 0 as in every backend."""
    q, k, v, _, g = _inputs(2, 2, 37, 37, 32, torch.float32, "cpu")
    mask = _make_mask("tail", 2, 37, "cpu", g)
    tri = attention(q, k, v, key_padding_mask=mask, backend="triton")
    torch.testing.assert_close(tri, kernels.flash_attention(q, k, v, key_padding_mask=mask), rtol=0, atol=0)
    full = torch.ones(2, 37, dtype=torch.bool)
    assert attention(q, k, v, key_padding_mask=full, backend="math").abs().max() == 0
    assert attention(q, k, v, key_padding_mask=full, backend="triton").abs().max() == 0


@needs_kernels
def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 37, 32, dtype=torch.float16)
        k = torch.empty(2, 3, 23, 32, dtype=torch.float16)
        mask = torch.empty(2, 23, dtype=torch.bool)
        out, lse = torch.ops.dream.flash_attn_fwd(q, k, k, mask, False, 0.5)
        dq, dk, dv = torch.ops.dream.flash_attn_bwd(out, q, k, k, out, lse, mask, False, 0.5)
    assert out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)


@needs_kernels
def test_opcheck():
    q, k, v, do, g = _inputs(1, 2, 20, 18, 32, torch.float32, "cpu")
    mask = _make_mask("random", 1, 18, "cpu", g)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.dream.flash_attn_fwd.default, (q, k, v, mask, True, 0.2))
    torch.library.opcheck(torch.ops.dream.flash_attn_fwd.default, (q, k, v, None, False, 0.2))


@needs_kernels
def test_torch_compile_traces_through():
    q, k, v, do, g = _inputs(1, 2, 37, 37, 32, torch.float32, "cpu")
    mask = _make_mask("random", 1, 37, "cpu", g)

    def fn(a, b, c):
        return kernels.flash_attention(a * 1.5, b, c, key_padding_mask=mask, causal=True)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager = _fwd_bwd(fn, q, k, v, do)
    comp = _fwd_bwd(compiled, q, k, v, do)
    for a, b in zip((eager[0],) + eager[1], (comp[0],) + comp[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("bad,exc,match", [
    (dict(q=torch.randn(1, 2, 8, 32, dtype=torch.float64)), TypeError, "fp16, bf16 and fp32"),
    (dict(k=torch.randn(1, 2, 8, 32, dtype=torch.float16)), TypeError, "share a dtype"),
    (dict(q=torch.randn(2, 8, 32)), ValueError, "4-D"),
    (dict(q=torch.randn(1, 2, 8, 256), k=torch.randn(1, 2, 8, 256), v=torch.randn(1, 2, 8, 256)), ValueError,
     "head dim 256"),
    (dict(v=torch.randn(1, 2, 9, 32)), ValueError, "same shape"),
    (dict(key_padding_mask=torch.zeros(1, 8)), TypeError, "bool"),
    (dict(key_padding_mask=torch.zeros(1, 7, dtype=torch.bool)), ValueError, r"\(B, Nk\)"),
])
def test_bad_inputs_raise(bad, exc, match):
    args = dict(q=torch.randn(1, 2, 8, 32), k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32))
    args.update(bad)
    with pytest.raises(exc, match=match):
        kernels.flash_attention(**args)


def test_supports_head_dim():
    if kernels.is_available():
        assert all(kernels.supports_head_dim(d) for d in (32, 64, 128, 40))
    assert not kernels.supports_head_dim(256) and not kernels.supports_head_dim(0)


def test_unavailable_without_cuda_or_interpreter():
    """Without CUDA and without the interpreter the package imports, says why, and refuses to run."""
    code = (
        "import torch, dream.kernels as k\n"
        "assert not k.is_available()\n"
        "assert 'TRITON_INTERPRET' in k.unavailable_reason(), k.unavailable_reason()\n"
        "try:\n"
        "    k.flash_attention(*[torch.randn(1, 1, 4, 32)] * 3)\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as tcompile
from dream.kernels import attention as A

consts = dict(HEAD_DIM=40, BLOCK_D=64, HAS_MASK=True, CAUSAL=True, IEEE=False, UPCAST=False)
ptrs = dict(Q="*fp16", K="*fp16", V="*fp16", Out="*fp16", DO="*fp16", DK="*fp16", DV="*fp16", DQ="*fp16",
            Mask="*u8", Lse="*fp32", Delta="*fp32")
for arch in (80, 90):
    for kern in (A._fwd_kernel, A._bwd_kv_kernel, A._bwd_q_kernel, A._bwd_preprocess_kernel):
        fn = kern.fn if hasattr(kern, "configs") else kern  # unwrap the autotuner
        cfg = kern.configs[0] if hasattr(kern, "configs") else None
        c = {k: v for k, v in consts.items() if k in fn.arg_names}
        c.update(cfg.kwargs if cfg else dict(BLOCK_M=128))
        sig = {n: "constexpr" if n in c else ptrs.get(n, "fp32" if n.endswith("scale") else "i32")
               for n in fn.arg_names}
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if cfg else {}
        k = tcompile(ASTSource(fn=fn, signature=sig, constexprs=c), target=GPUTarget("cuda", arch, 32), options=opts)
        assert k.asm["cubin"] and k.metadata.shared < 160 * 1024, (fn.__name__, arch, k.metadata.shared)
print("ok")
"""


@pytest.mark.slow
def test_kernels_compile_for_gpu_without_one():
    """Ahead-of-time compile of every kernel to sm_80 / sm_90 cubins (Triton's bundled ptxas; no GPU needed)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# GPU: the same checks at DREAM shapes
# ---------------------------------------------------------------------------------------------------------

GPU_CASES = [
    # (B, H, Nq, Nk, Dh, causal, mask)
    (2, 12, 320, 320, 64, False, "none"),  # decoder self-attention: 64 buffer + 256 tokens
    (4, 12, 64 + 37, 64 + 37, 64, False, "tail"),  # encoder, ragged visible counts
    (4, 12, 64 + 100, 64 + 100, 64, False, "random"),
    (2, 16, 320, 128, 64, False, "tail"),  # cross-attention to text tokens
    (2, 8, 256, 256, 128, True, "none"),
    (2, 8, 1000, 1000, 32, True, "tail"),
    (3, 4, 1, 63, 64, False, "none"),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bsz,heads,nq,nk,head_dim,causal,mask_kind", GPU_CASES)
def test_parity_gpu(bsz, heads, nq, nk, head_dim, causal, mask_kind, dtype):
    _run_parity(bsz, heads, nq, nk, head_dim, dtype, causal, mask_kind, "cuda")


@pytest.mark.gpu
@needs_gpu
def test_fully_padded_rows_gpu():
    q, k, v, do, _ = _inputs(2, 4, 101, 101, 64, torch.float16, "cuda")
    mask = torch.zeros(2, 101, dtype=torch.bool, device="cuda")
    mask[1] = True
    out, grads = _fwd_bwd(lambda a, b, c: kernels.flash_attention(a, b, c, key_padding_mask=mask), q, k, v, do)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert all(torch.isfinite(t).all() and t[1].abs().max() == 0 for t in grads)


@pytest.mark.gpu
@needs_gpu
def test_autotune_buckets_lengths_gpu():
    """Ragged encoder lengths in one power-of-two bucket share a single autotuning result."""
    from dream.kernels import attention as kattn

    before = len(kattn._fwd_kernel.cache)
    for n_vis in (70, 80, 90, 100):  # 64 + n_vis in (128, 256]: one bucket
        q = torch.randn(2, 4, 64 + n_vis, 64, device="cuda", dtype=torch.float16)
        kernels.flash_attention(q, q, q)
    assert len(kattn._fwd_kernel.cache) - before <= 1


@pytest.mark.gpu
@needs_gpu
def test_inductor_compile_gpu():
    q, k, v, do, _ = _inputs(2, 8, 320, 320, 64, torch.bfloat16, "cuda")

    def fn(a, b, c):
        return kernels.flash_attention(a, b, c).float().sum(-1)

    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)
