"""Numerical tolerances of the test suite, derived from rounding-error analysis (not tuned on one machine).

Two computations of the same math in floating point agree only up to their rounding errors, and those
depend on the reduction order -- the CPU's SIMD width (AVX2, AVX-512, AMX), the BLAS kernel and the thread
count all change it. A threshold read off one machine's measured difference fails on the next. The helpers
here state instead how large the rounding error of a computation can be, from its dtype and reduction size:

* ``U[dtype]``: unit roundoff u (half the machine epsilon): ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``.
* :func:`gemm_rel_tol`: a dot product of length n computed in floating point, in any order, has error at
  most ``gamma_n |x|^T |y|`` with ``gamma_n = n u / (1 - n u)`` (Higham, "Accuracy and Stability of Numerical
  Algorithms", 2nd ed., SIAM 2002, section 3.1). That worst case assumes every rounding error has the same
  sign; modelling them as independent zero-mean random variables, the error is at most
  ``~ lambda sqrt(n) u |x|^T |y|`` with a probability that tends to 1 like ``1 - exp(-lambda^2 / 2)`` per
  rounding chain (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
  Comput. 41(5), 2019). For the zero-mean random data of the tests the partial sums of a reduction are of
  the order of its result, so the same ``sqrt(n) u`` holds relative to the output's largest entry.
  ``depth`` chained reductions (layers) add their relative errors to first order; ``c = lambda = 4``
  by default, i.e. four standard deviations of the rounding-error random walk.
* :func:`lowp_rel_tol`: ``c * depth * u`` for bfloat16 / float16 computations with float32 accumulation.
* :func:`assert_2x`: flash-attention's acceptance rule ("FlashAttention's numerical error is at most twice
  the numerical error of a PyTorch implementation", github.com/Dao-AILab/flash-attention
  ``tests/test_flash_attn.py``) for two implementations of the same math in the same dtype: evaluate the
  math in float64 (the "truth"); our error must be at most twice the error of the plain reference
  implementation in the same dtype, plus the rounding of the truth itself to that dtype. Both sides scale
  with the same reduction lengths and the same epsilon, so the rule holds on any CPU and at any thread
  count, and it is sharp: a real mistake (a wrong constant, a dropped term) moves our result by far more
  than rounding. For outputs of a few entries (a score per prompt) the reference's largest error can be
  small by chance; such sites add a ``floor`` of one reduction's bound, ``gemm_rel_tol(dtype, n)``.
* :func:`mean_tol` / :func:`binomial_tol`: tolerance of a sample mean / proportion (Monte Carlo estimate of
  an expectation or a probability) in standard errors.

Set ``DREAM_TOL_REPORT=1`` (with ``pytest -s``) to print every check's measured error next to its bound.

Errors are *relative* in the max norm, ``max|a - b| / max|b|``: one number per output tensor, compared with
a bound that depends only on the dtype and the reduction sizes read off the computation.
"""
from __future__ import annotations

import math
import os

import torch

# unit roundoff u = 2^-p for a p-bit significand (round to nearest)
U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def report(what: str, err: float, bound: float) -> None:
    """Print ``what: measured error / bound`` when ``DREAM_TOL_REPORT`` is set (how tight each bound is)."""
    if os.environ.get("DREAM_TOL_REPORT"):
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
        print(f"\n[tol] {what}: error {err:.3e} bound {bound:.3e} ({ratio:.2f} of the bound)")


def gemm_rel_tol(dtype: torch.dtype, n: int, depth: int = 1, c: float = 4.0) -> float:
    """Probabilistic relative error bound ``c * depth * sqrt(n) * u`` of ``depth`` chained dot products of
    length ``n`` in ``dtype`` (Higham & Mary 2019; ``c`` is their lambda).

    ``n`` is the longest reduction of the computation (a Linear's fan-in, a conv's ``C_in * kh * kw``, an
    attention's key count or head dim), ``depth`` the number of such reductions one output depends on in
    sequence (layers; a residual network adds rather than multiplies their errors to first order).
    """
    if n < 1 or depth < 1:
        raise ValueError(f"n and depth must be >= 1, got n={n}, depth={depth}")
    return c * depth * math.sqrt(n) * U[dtype]


def lowp_rel_tol(dtype: torch.dtype, depth: int, c: float = 4.0) -> float:
    """Relative error bound ``c * depth * u`` of ``depth`` chained reductions whose operands and results are
    rounded to a 16-bit ``dtype`` (bfloat16, float16) but which accumulate in float32, as CPU and GPU
    half-precision GEMMs do: rounding the two operands perturbs each product by at most ~2u relative,
    independently from product to product, so the reduction's relative error is O(u) whatever its length n
    (the float32 accumulation adds ``sqrt(n) u32``, negligible), plus u for rounding the result; ``depth``
    such layers add to first order."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return c * depth * U[dtype]


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64 (``b`` is the reference; 0 / 0 counts as 0)."""
    a, b = torch.as_tensor(a).detach().double().cpu(), torch.as_tensor(b).detach().double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> float:
    """Assert ``max_rel_err(actual, expected) <= tol``; returns the measured error."""
    err = max_rel_err(actual, expected)
    report(what, err, tol)
    assert err <= tol, f"{what}: relative max error {err:.3e} > bound {tol:.3e}"
    return err


def assert_2x(ours: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, what: str = "",
              floor: float = 0.0) -> tuple[float, float]:
    """Flash-attention's rule: ``|ours - truth| <= 2 |ref - truth| + 2 |fl(truth) - truth| + floor * max|truth|``.

    Args:
        ours: our result in the test dtype (e.g. a fast path in float32).
        ref: the plain reference implementation of the same math in the same dtype as ``ours``.
        truth: the same math in float64 (the reference, or our implementation, run with float64 modules
            and inputs).
        floor: an extra relative allowance (default 0) for outputs of a few entries, whose reference error
            can be small by chance (then ``2 |ref - truth|`` gives no room for another reduction order).
    Returns:
        (our relative error, the reference's relative error), both divided by ``max|truth|``.
    """
    ours, ref = ours.detach(), ref.detach()
    assert ours.dtype == ref.dtype, f"{what}: ours is {ours.dtype}, the reference {ref.dtype}"
    truth = truth.detach().double().cpu()
    scale = max(float(truth.abs().max()), 1e-300)
    err, base = max_rel_err(ours, truth) * scale, max_rel_err(ref, truth) * scale
    rounding = float((truth.to(ours.dtype).double() - truth).abs().max())
    bound = 2 * base + 2 * rounding + floor * scale
    report(what, err / scale, bound / scale)
    assert err <= bound, (f"{what}: our {ours.dtype} error {err / scale:.3e} > 2 x reference error {base / scale:.3e} "
                          f"+ 2 x rounding {rounding / scale:.3e} + floor {floor:.1e} (relative to max|truth|)")
    return err / scale, base / scale


def mean_tol(std: float, n: int, z: float = 5.0, extra: float = 0.0) -> float:
    """Tolerance ``z * std / sqrt(n) + extra`` of the mean of ``n`` independent draws with standard deviation
    ``std`` (``z = 5``: a correct sampler fails with probability < 6e-7 per check, by the central limit
    theorem). ``extra`` covers a reference that is itself rounded (e.g. a table printed to 3 decimals)."""
    return z * std / math.sqrt(n) + extra


def binomial_tol(p: float, n: int, z: float = 5.0, extra: float = 0.0) -> float:
    """:func:`mean_tol` of a proportion with probability ``p``: std ``sqrt(p (1 - p))``."""
    return mean_tol(math.sqrt(p * (1.0 - p)), n, z, extra)


__all__ = ["U", "report", "gemm_rel_tol", "lowp_rel_tol", "max_rel_err", "assert_rel_close",
           "assert_2x", "mean_tol", "binomial_tol"]

