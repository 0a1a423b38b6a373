"""Every attention backend against one reference, in one table.

The reference is ``attention_ref`` (backend ``math``: plain ``softmax(q k^T * scale + masks) v``, fully masked
rows give 0) evaluated in float64. Each backend -- ``math`` itself in the test dtype, ``sdpa``, ``eager`` (the CPU
training path) and ``triton`` (through the interpreter on CPU) -- must satisfy flash-attention's "2x rule" for
the output and for dq, dk, dv: its error against the float64 reference is at most twice the error of the plain
reference computed in the same dtype, plus the rounding of the reference itself to that dtype. Both terms scale
with the reduction length and the dtype's epsilon, so the bound holds for any CPU, thread count or reduction
order (no tolerance is tuned on a machine). The rule needs a reference of higher precision than the dtype under
test, so the table has float32 and bfloat16 rows (float64 would need a float128 reference).
"""
from __future__ import annotations

import math

import pytest
import torch

from dream.ops.attention import BACKENDS, attention, attention_ref, resolve_backend
from dream.ops.dropout import dropout_mask
from tolerance import assert_rel_close, gemm_rel_tol


def _kernels_ok() -> bool:
    try:
        from dream import kernels

        return kernels.is_available()
    except Exception:  # noqa: BLE001 - a broken optional binary is "unavailable"
        return False


# (name, B, H, Nq, Nk, Dh, causal, padding): padding "none" | "ragged" | "one_empty" (a fully padded element)
CASES = [
    ("self", 2, 2, 19, 19, 32, False, "none"),
    ("self-ragged", 3, 2, 21, 21, 32, False, "ragged"),
    ("cross", 2, 2, 17, 9, 32, False, "ragged"),
    ("cross-empty-row", 3, 2, 11, 7, 32, False, "one_empty"),
    ("causal", 2, 2, 16, 16, 32, True, "none"),
    ("causal-ragged", 2, 2, 16, 16, 32, True, "ragged"),
]
BACKEND_DTYPES = [("math", torch.float32), ("sdpa", torch.float32), ("eager", torch.float32),
                  ("sdpa", torch.bfloat16), ("eager", torch.bfloat16), ("triton", torch.float32)]


def _inputs(B, H, Nq, Nk, Dh, padding, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, Dh, generator=g, dtype=torch.float64) for n in (Nq, Nk, Nk))
    do = torch.randn(B, H, Nq, Dh, generator=g, dtype=torch.float64)
    pad = None
    if padding == "ragged":
        keep = torch.tensor([max(1, Nk - 3 * b - 1) for b in range(B)])
        pad = torch.arange(Nk)[None, :] >= keep[:, None]
    elif padding == "one_empty":
        pad = torch.zeros(B, Nk, dtype=torch.bool)
        pad[1, :] = True
        pad[2, Nk // 2:] = True
    return [t.to(dtype) for t in (q, k, v, do)], pad


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_reference(backend, dtype, case):
    if backend == "triton" and not _kernels_ok():
        pytest.fail("the Triton kernels are part of the test setup (TRITON_INTERPRET=1 on CPU) but unavailable")
    _, B, H, Nq, Nk, Dh, causal, padding = case
    (q, k, v, do), pad = _inputs(B, H, Nq, Nk, Dh, padding, dtype)
    run = (lambda be: (lambda a, b, c: attention(a, b, c, key_padding_mask=pad, is_causal=causal, backend=be)))
    ours = _fwd_bwd(run(backend), q, k, v, do)
    ref = _fwd_bwd(lambda a, b, c: attention_ref(a, b, c, key_padding_mask=pad, is_causal=causal, upcast=False),
                   q.double(), k.double(), v.double(), do.double())
    same = _fwd_bwd(lambda a, b, c: attention_ref(a, b, c, key_padding_mask=pad, is_causal=causal, upcast=False),
                    q, k, v, do)
    for name, o, r, s in zip(("out", "dq", "dk", "dv"), ours, ref, same):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{backend} {name}: non-finite values"
        o, s = o.double(), s.double()
        rounding = 2 * (r.to(dtype).double() - r).abs().max().item()
        err, base = (o - r).abs().max().item(), (s - r).abs().max().item()
        assert err <= 2 * base + rounding, f"{backend} {name}: {err:.3e} > 2 x {base:.3e} + {rounding:.3e}"
    if padding == "one_empty":   # fully masked rows give exactly 0 in every backend
        assert float(ours[0][1].abs().max()) == 0.0


def test_eager_dropout_is_reference_softmax_times_the_keep_mask():
    (q, k, v, _), pad = _inputs(3, 2, 7, 9, 16, "ragged", torch.float32)
    torch.manual_seed(11)
    ours = attention(q, k, v, key_padding_mask=pad, dropout_p=0.3, backend="eager")
    torch.manual_seed(11)
    keep = dropout_mask((3, 2, 7, 9), 0.3)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(16)
    probs = torch.softmax(s.masked_fill(pad[:, None, None, :], float("-inf")), dim=-1)
    # the same function (softmax, mask, product) with q scaled before instead of after q k^T: a reduction of length
    # Dh = 16 then one of length Nk = 9, each in float32
    assert_rel_close(ours, (probs * keep) @ v, gemm_rel_tol(torch.float32, 16, depth=2), "eager dropout")


def test_backend_resolution_table():
    cpu = torch.zeros(1, 1, 4, 32)
    assert set(BACKENDS) == {"auto", "triton", "sdpa", "math", "eager"}
    assert resolve_backend("auto", cpu, cpu, 0.0) == "sdpa"
    assert resolve_backend("auto", cpu, cpu, 0.1) == "eager"          # CPU training: the cheap dropout path
    assert resolve_backend("sdpa", cpu, cpu, 0.1) == "sdpa"           # an explicit request is honoured
    assert resolve_backend("eager", cpu, cpu, 0.0) == "eager"
    with pytest.raises(RuntimeError, match="does not implement dropout"):
        resolve_backend("math", cpu, cpu, 0.1)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", cpu, cpu, 0.0)


def test_attention_module_train_path_equals_eval_path_without_dropout():
    from dream.models.layers import Attention

    att = Attention(32, 4, attn_drop=0.0, proj_drop=0.0)
    x = torch.randn(2, 5, 32)
    att.eval()
    ref = att(x)
    att.train()
    att.attn_drop = 1e-9  # routes through the eager dropout backend; a drop this rare leaves nothing dropped
    assert resolve_backend(att.attn_backend, x[:, None], x[:, None], att.attn_drop) == "eager"
    # eager (q scaled first) vs SDPA on the same inputs: projections of fan-in 32, scores over Dh = 8, output over 5
    assert_rel_close(att(x), ref, gemm_rel_tol(torch.float32, 32, depth=3), "train path vs eval path")
