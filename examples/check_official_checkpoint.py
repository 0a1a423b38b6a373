"""Load an official DREAM (arXiv 2603.02667) checkpoint and check it before using it.

The checkpoint is an official training checkpoint (``checkpoint-last.pth``: ``{"model", "model_ema", "args",
...}``, github.com/chaoli-charlie/dream), a ``.safetensors`` file with the official key names, or a folder
holding either. Official checkpoints pickle an ``argparse.Namespace`` under ``args``; the file is read with
``torch.load(weights_only=True)`` with exactly that class allow-listed, never fully unpickled.

The report: which keys of the model the checkpoint lacks (missing), which it has in excess (unexpected), which
have another shape, the parameter count, and so whether the weights load strictly (the model is built on the
meta device: even DREAM-G is checked without allocating its weights twice). With ``--parity-fixture`` it
also recomputes every output of an official parity fixture (``dream.parity.run_parity``) and prints the
table: with the checkpoint's own weights when the checkpoint has the fixture's architecture (then the
checkpoint must reproduce the official outputs), otherwise with the fixture's weights (a check of the
implementation only).

Run::

    python examples/check_official_checkpoint.py checkpoint-last.pth --arch dream_b
    python examples/check_official_checkpoint.py tests/fixtures/official_dream_tiny/model.safetensors \\
        --official-config tests/fixtures/official_dream_tiny/config.json \\
        --parity-fixture tests/fixtures/official_dream_tiny --out report.json

``--arch`` is a registered architecture (``dream_b/l/h/g``, see ``dream.list_models()``); ``--official-config``
a JSON of official constructor arguments (``constructor_args`` + ``text_cfg``, the parity fixture's
``config.json``). EMA weights are used when the checkpoint has them (``--weights model`` for the raw ones).
Exits non-zero when anything fails.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="official .pth, .safetensors, or a folder holding one")
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--arch", help="registered architecture (dream_b, dream_l, dream_h, dream_g, ...)")
    arch.add_argument("--official-config", help="JSON with the official constructor_args and text_cfg")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint (default: EMA when present)")
    p.add_argument("--parity-fixture", default=None, help="official parity fixture folder to recompute")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p.parse_args(argv)


def build_model(args):
    """The architecture to check against, on the meta device (shapes only, no memory)."""
    import torch

    import dream
    from dream.parity import config_from_official

    with torch.device("meta"):
        if args.arch:
            return dream.create_model(args.arch)
        return dream.create_model(config_from_official(json.loads(Path(args.official_config).read_text())))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from dream.models.convert import compare_state_dict, read_state_dict

    model = build_model(args)
    sd = read_state_dict(args.checkpoint, prefer_ema=args.weights == "ema", allow_args_namespace=True)
    diff = compare_state_dict(model, sd)
    report = {"checkpoint": str(args.checkpoint), "weights": args.weights, "tensors": len(sd),
              "model_tensors": len(model.state_dict()), **diff,
              "parameters": sum(p.numel() for p in model.parameters()),
              "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})}
    report["strict_match"] = not any(diff.values())
    print(f"{args.checkpoint}: {len(sd)} tensors ({', '.join(report['dtypes'])}), model {report['model_tensors']}; "
          f"{len(diff['missing'])} missing / {len(diff['unexpected'])} unexpected keys, "
          f"{len(diff['shape_mismatch'])} shape mismatches")
    for kind, names in diff.items():
        for name in names[:10]:
            print(f"  {kind}: {name}")
        if len(names) > 10:
            print(f"  ... and {len(names) - 10} more {kind}")
    print(f"parameters: {report['parameters']:,}; loads strictly: {'yes' if report['strict_match'] else 'NO'}")

    if args.parity_fixture and report["strict_match"]:
        from dream.parity import config_from_official, run_parity

        fixture_cfg = config_from_official(json.loads((Path(args.parity_fixture) / "config.json").read_text()))
        own = fixture_cfg == model.config
        with torch.enable_grad():                 # the fixture holds gradients too
            rows = run_parity(args.parity_fixture, state_dict=sd if own else None)
        report["parity_weights"] = "checkpoint" if own else "fixture"
        report["parity"] = [{"output": n, "error": e, "ok": ok} for n, e, ok in rows]
        width = max(len(n) for n, _, _ in rows)
        print("parity with the checkpoint's weights:" if own else "parity with the fixture's own weights (the "
              "checkpoint has another architecture; this checks the implementation):")
        for n, e, ok in rows:
            print(f"  {n:<{width}}  {e:.2e}  {'ok' if ok else 'FAIL'}")
        failed = sum(not ok for _, _, ok in rows)
        print(f"parity: {len(rows) - failed} of {len(rows)} outputs match")
        report["parity_ok"] = failed == 0

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["strict_match"] and report.get("parity_ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
