"""``dream check-parity FIXTURE_DIR``: recompute every output of an official parity fixture
(:func:`dream.parity.run_parity`) and exit non-zero if any differs by more than ``--tol``."""
from __future__ import annotations

import torch

from dream.parity import TOL, run_parity


def add_arguments(p):
    p.add_argument("fixture", help="folder with config.json, model.safetensors, io.safetensors, grads.safetensors")
    p.add_argument("--tol", type=float, default=TOL, help=f"max error relative to max|ref| (default {TOL:g})")
    p.add_argument("--verbose", action="store_true", help="print the exception of outputs that fail to compute")


def run(args) -> int:
    torch.set_grad_enabled(True)
    rows = run_parity(args.fixture, verbose=args.verbose, tol=args.tol)
    width = max(len(r[0]) for r in rows)
    for name, err, ok in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {err:.3e}")
    bad = [r for r in rows if not r[2]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed (tolerance {args.tol:g} relative to max|ref|)")
    return 1 if bad else 0
