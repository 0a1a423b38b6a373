"""Flash attention (forward and backward) in Triton, exposed as a ``torch.library`` custom op.

What: exact softmax attention ``softmax(q k^T * scale + masks) v`` for (B, H, N, Dh) tensors without
materialising the N x N score matrix. The forward pass streams key/value blocks through an online
softmax and saves the per-row log-sum-exp; the backward pass recomputes the probabilities from it
(FlashAttention-2: Dao, arXiv 2307.08691; FlashAttention: Dao et al., arXiv 2205.14135). Re-implemented
from the papers; the layout of this file (kernels -> launchers registered as ``torch.library`` custom
ops with fake implementations -> autograd wiring -> functional API) follows Dao-AILab/flash-attention
and the Triton fused-attention tutorial (both permissive licences), no code copied.

Semantics (the reference is ``dream.ops.attention.attention_ref``):
    * q (B, H, Nq, Dh), k and v (B, H, Nk, Dh); any Nq, Nk >= 0 (ragged tails are masked in-kernel);
      fp16, bf16 or fp32 (all three must match); 1 <= Dh <= 128 (padded to a power of two inside).
    * ``key_padding_mask`` (B, Nk) bool, True = padded key (never attended to).
    * ``causal``: query i attends keys j <= i, aligned top-left (``torch.tril`` of the (Nq, Nk)
      matrix, the same as SDPA's ``is_causal``).
    * ``scale`` defaults to Dh ** -0.5.
    * A query row with no key left to attend (all its keys padded) outputs **0** and gets zero
      gradients; its log-sum-exp is -inf. (The plain softmax reference would give NaN there.)
    * Accumulation is fp32; fp32 inputs use IEEE fp32 ``tl.dot`` (no TF32) to match PyTorch's default.

Backward: a preprocess kernel computes delta = rowsum(dO * O); one kernel per key block accumulates
dK and dV over query blocks, one kernel per query block accumulates dQ over key blocks (no atomics, so
results are deterministic).

CPU interpreter (``TRITON_INTERPRET=1``, read when this module is imported): one fixed small block
configuration; bf16 ``tl.dot`` is broken in the interpreter (bf16 is stored as uint16 there), so for bf16
the interpreter path upcasts the dot operands to fp32 after rounding them to bf16, which gives the same
products as the GPU's bf16 tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._autotune import (
    BWD_KV_CONFIGS,
    BWD_Q_CONFIGS,
    FWD_CONFIGS,
    INTERPRET,
    PREPROCESS_BLOCK_M,
    PRUNE_BWD_KV,
    PRUNE_BWD_Q,
    PRUNE_FWD,
    TUNE_KEY,
    bucket_length,
)

__all__ = ["flash_attention", "supports_head_dim", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634  # log2(e): the kernels work in base 2 (exp2 is the native instruction)
_LN2 = 0.6931471805599453


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernel handles this head dimension (1..128; non powers of two are zero-padded)."""
    return 1 <= int(head_dim) <= MAX_HEAD_DIM


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; IEEE fp32 for fp32 inputs, fp32 operands in the interpreter."""
    if UPCAST:  # interpreter + bf16: the interpreter's bf16 dot is broken, operands are exact in fp32
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _key_is_valid(Mask, mask_base, stride_mn, offs_n, N_K, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) True for keys inside the sequence and not padded."""
    valid = offs_n < N_K
    if HAS_MASK:
        padded = tl.load(Mask + mask_base + offs_n * stride_mn, mask=valid, other=1)
        valid = valid & (padded == 0)
    return valid


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE_FWD)
@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_mb, stride_mn,
    H, N_Q, N_K, qk_scale,
    N_Q_BUCKET, N_K_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head); online softmax over key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = b * stride_qb + h * stride_qh
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    mask_base = b * stride_mb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < N_Q
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = N_K
    if CAUSAL:  # top-left aligned: no key beyond the block's last query row is needed
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_is_valid(Mask, mask_base, stride_mn, offs_n, N_K, HAS_MASK)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N) logits in base 2
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet: avoid inf-inf
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # every key masked for this row: output 0, lse = +inf (so backward p = 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_base = b * stride_ob + h * stride_oh
    tl.store(Out + o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["N_Q"])
def _bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d] (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    msk = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=msk, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.autotune(configs=BWD_KV_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE_BWD_KV)
@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _bwd_kv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_mb, stride_mn,
    H, N_Q, N_K, qk_scale, sm_scale,
    N_Q_BUCKET, N_K_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, head); accumulate dK, dV over query blocks.

    Works on transposed tiles (keys x queries): p^T = exp2(s^T - lse), dV += p^T dO,
    dp^T = V dO^T, ds^T = p^T * (dp^T - delta), dK += ds^T Q * scale.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = b * stride_qb + h * stride_qh
    do_base = b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N_Q  # into Lse / Delta (B*H, N_Q)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_in = offs_n < N_K
    key_ok = _key_is_valid(Mask, b * stride_mb, stride_mn, offs_n, N_K, HAS_MASK)
    kv_mask = key_in[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:  # queries before this key block never see it
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_Q
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)

        s_t = _mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE, UPCAST) * qk_scale
        valid = key_ok[:, None]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        s_t = tl.where(valid, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])  # (BLOCK_N, BLOCK_M); 0 where masked or lse = +inf
        dv = _mma(p_t.to(do.dtype), do, dv, IEEE, UPCAST)
        dp_t = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk, IEEE, UPCAST)

    dk = dk * sm_scale
    tl.store(DK + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=BWD_Q_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE_BWD_Q)
@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _bwd_q_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_mb, stride_mn,
    H, N_Q, N_K, qk_scale, sm_scale,
    N_Q_BUCKET, N_K_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); dQ = sum over key blocks of ds K * scale."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    mask_base = b * stride_mb
    row_base = pid_bh.to(tl.int64) * N_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < N_Q
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(Q + q_off, mask=qd_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_is_valid(Mask, mask_base, stride_mn, offs_n, N_K, HAS_MASK)
        kv_mask = (offs_n < N_K)[:, None] & d_ok[None, :]
        k = tl.load(K + k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST) * qk_scale
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dp = _mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, IEEE, UPCAST)

    dq = dq * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(key_padding_mask: Optional[torch.Tensor], like: torch.Tensor):
    """(tensor, stride_b, stride_n, has_mask); the bool mask is read as uint8 (same bytes, no copy)."""
    if key_padding_mask is None:
        return like, 0, 0, False  # dummy pointer, never read (HAS_MASK=False)
    m = key_padding_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _common_meta(q: torch.Tensor, nq: int, nk: int, has_mask: bool, causal: bool) -> dict:
    head_dim = q.shape[-1]
    return dict(
        N_Q_BUCKET=bucket_length(nq), N_K_BUCKET=bucket_length(nk),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_MASK=has_mask, CAUSAL=bool(causal),
        IEEE=q.dtype == torch.float32, UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )


def _flash_fwd(q, k, v, key_padding_mask, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out (B, H, Nq, Dh) and lse (B, H, Nq) fp32 in base 2."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    bsz, heads, nq, _ = q.shape
    nk = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, heads, nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if nk == 0:  # no keys at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), bsz * heads)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _fwd_kernel[grid](
            q, k, v, mask, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            smb, smn,
            heads, nq, nk, scale * _LOG2E,
            **_common_meta(q, nq, nk, has_mask, causal),
        )
    return out, lse


def _flash_bwd(do, q, k, v, out, lse, key_padding_mask, causal: bool, scale: float):
    """Launch the three backward kernels. Returns dq, dk, dv shaped like q, k, v."""
    do, q, k, v, out = (_last_dim_contiguous(t) for t in (do, q, k, v, out))
    bsz, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if nq == 0 or nk == 0 or bsz * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((bsz, heads, nq), dtype=torch.float32, device=q.device)
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    meta = _common_meta(q, nq, nk, has_mask, causal)
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        smb, smn,
    )
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _bwd_preprocess_kernel[(triton.cdiv(nq, PREPROCESS_BLOCK_M), bsz * heads)](
            out, do, delta,
            out.stride(0), out.stride(1), out.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            heads, nq,
            HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=PREPROCESS_BLOCK_M,
        )
        kv_grid = lambda m: (triton.cdiv(nk, m["BLOCK_N"]), bsz * heads)  # noqa: E731
        _bwd_kv_kernel[kv_grid](q, k, v, mask, do, lse, delta, dk, dv, *strides,
                                heads, nq, nk, scale * _LOG2E, scale, **meta)
        q_grid = lambda m: (triton.cdiv(nq, m["BLOCK_M"]), bsz * heads)  # noqa: E731
        _bwd_q_kernel[q_grid](q, k, v, mask, do, lse, delta, dq, *strides,
                              heads, nq, nk, scale * _LOG2E, scale, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, traced through their fake implementations)
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("dream::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    causal: bool, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward op: (out (B, H, Nq, Dh) in q's dtype, lse (B, H, Nq) fp32, base-2, +inf for empty rows)."""
    return _flash_fwd(q, k, v, key_padding_mask, causal, scale)


@flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, key_padding_mask, causal, scale):
    bsz, heads, nq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((bsz, heads, nq),
                                                                                   dtype=torch.float32)


@torch.library.custom_op("dream::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward op: (dq, dk, dv) for the forward op's inputs, given dO and the saved out / lse."""
    return _flash_bwd(do, q, k, v, out, lse, key_padding_mask, causal, scale)


@flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(do, q, k, v, out, lse, key_padding_mask, causal, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attention expects 4-D (B, H, N, Dh) tensors; {name} has shape "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flash_attention supports fp16, bf16 and fp32; {name} is {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head dim")
    if not supports_head_dim(q.shape[-1]):
        raise ValueError(f"head dim {q.shape[-1]} is not supported (1..{MAX_HEAD_DIM})")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("flash_attention needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           f"dream.kernels is imported); got tensors on {q.device}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padded key), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Fused exact attention ``softmax(q k^T * scale + masks) v`` (differentiable in q, k, v).

    Args:
        q: (B, H, Nq, Dh) queries, fp16 / bf16 / fp32, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        k: (B, H, Nk, Dh) keys, same dtype and device.
        v: (B, H, Nk, Dh) values.
        key_padding_mask: optional (B, Nk) bool, True = padded key (excluded from every query).
        causal: query i attends keys j <= i (top-left aligned, as SDPA ``is_causal``).
        scale: softmax scale; default ``Dh ** -0.5``.
        return_lse: also return the natural-log log-sum-exp of the scaled, masked logits, (B, H, Nq) fp32
            (-inf for rows with no valid key; not differentiable).

    Returns:
        (B, H, Nq, Dh) output in the input dtype (rows with no valid key are 0), or ``(out, lse)``.
    """
    _check_inputs(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    out, lse2 = flash_attn_fwd(q, k, v, key_padding_mask, bool(causal), scale)
    if not return_lse:
        return out
    lse = torch.where(torch.isinf(lse2), torch.full_like(lse2, float("-inf")), lse2 * _LN2)
    return out, lse
