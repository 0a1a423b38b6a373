"""The DreamSync experiment on ShapesWorld: ``dream_tiny.shapes`` (or ``sd_tiny.shapes``), 3 rounds, K = 8.

Three runs share the training prompts (ShapesWorld train split, weighted toward counts and relations), the held-out
evaluation prompts (GenEval-shapes, test split, none equal to a training prompt) and the sampling seeds:

* ``main``: the verifier's *selection* variant as VQA judge (DSG score), the ShapesWorld aesthetic proxy, the
  default policy (theta_f 0.9, theta_a 0.6);
* ``random_selection``: the control: each round keeps as many pairs as the main rule would, for the same prompts,
  but with a uniformly random candidate (its round 1 reuses main's candidates and scores: same model, same seeds);
* ``self_judge``: DREAM as its own judge (:class:`~dream.align.judges.DreamSelfJudge`), and candidates scored
  part-way (DREAM's critic after a quarter of the tokens) so that only the best ``--keep`` of K are finished;
* ``self_judge_cost`` (DREAM only): the cost saved by part-way scoring, both ways timed in turn in one process
  (CPU seconds per prompt; the runs' wall times are not comparable when other jobs share the machine).

Every run is evaluated with the verifier's *evaluation* variant after each round (plain decoding, the pipeline's
sampler settings). Afterwards the main run's adapters are combined into one file (committed under
``benchmarks/results/``) and re-evaluated, loaded on the base model, on other held-out prompt seeds and sampling
seeds. Output: ``benchmarks/results/dreamsync_shapes.json`` (``base``, ``rounds``, ``random_selection``,
``self_judge``, ``reproduction``, ``timings``, ``adapter``, paired differences with standard errors).

    python benchmarks/dreamsync_shapes.py --out runs/dreamsync_shapes            # the full experiment
    python benchmarks/dreamsync_shapes.py --out /tmp/ds --prompts 32 --k 2 --rounds 1 --eval-prompts 16 --smoke
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/dreamsync_shapes", help="run folders (main, random_selection, self_judge)")
    p.add_argument("--model", default="dream_tiny.shapes")
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--keep", type=int, default=4, help="self-judge run: candidates finished after partial scoring")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--repro-seeds", type=int, nargs="*", default=[1, 2], help="other held-out prompt seeds")
    p.add_argument("--lora", default='{"rank": 16, "lr": 5e-4, "epochs": 6, "batch_size": 32, "min_steps": 100, '
                                     '"max_steps": 400}', help="LoraTrainConfig fields (JSON)")
    p.add_argument("--candidate-sampler", default='{"num_sampling_steps": "15", "num_iter": 12}',
                   help="sampler overrides for the candidates (JSON; the evaluation keeps the pipeline's settings)")
    p.add_argument("--runs", nargs="*", default=["main", "random_selection", "self_judge", "self_judge_cost"])
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "dreamsync_shapes.json"))
    p.add_argument("--adapter-dir", default=str(REPO / "benchmarks" / "results" / "dreamsync_shapes_lora"))
    p.add_argument("--num-real", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="tiny settings for tests (no committed adapter)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _config(args, **kw):
    from dream.align import DreamSyncConfig

    return DreamSyncConfig(model=args.model, num_prompts=args.prompts, k=args.k, rounds=args.rounds,
                           eval_prompts=args.eval_prompts, num_real=args.num_real, lora=json.loads(args.lora),
                           candidate_sampler=json.loads(args.candidate_sampler), **kw)


def _seed_from(src: Path, dst: Path, what) -> None:
    """Copy finished stages that are identical by construction (same model, prompts and seeds)."""
    for rel in what:
        s, d = src / rel, dst / rel
        if s.exists() and not d.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if s.is_dir() else shutil.copy2)(s, d)


def _summary(report: dict) -> dict:
    return {"rounds": [{"selection": e["selection"], "eval": {k: v for k, v in e["eval"].items() if k != "per_prompt"},
                        "generation_seconds": e.get("generation", {}).get("seconds")} for e in report["rounds"]],
            "final": {k: v for k, v in report["rounds"][-1]["eval"].items() if k != "per_prompt"}}


def _gains(base: dict, final: dict) -> dict:
    from dream.eval.geneval_shapes import paired_difference

    out = {"prompt_accuracy": paired_difference(base, final, "prompt_pass")}
    for c in ("counting", "position", "single_object", "two_object", "colors", "color_attr", "over_count"):
        try:
            out[c] = paired_difference(base, final, c)
        except ValueError:
            pass
    out["per_type"] = {t: final["per_type"].get(t, float("nan")) - base["per_type"].get(t, float("nan"))
                       for t in base["per_type"]}
    out["fid_ratio"] = final.get("fid_cnn", float("nan")) / base.get("fid_cnn", float("nan"))
    return out


def reproduce(args, adapter: Path, seeds) -> dict:
    """Base vs base + the combined adapter on other held-out prompt seeds and sampling seeds."""
    from dream.align import load_generator
    from dream.eval.geneval_shapes import GenEvalShapes, geneval_prompts

    train = [json.loads(x)["prompt"] for x in (Path(args.out) / "main" / "prompts.jsonl").read_text().splitlines()
             if x.strip()]
    bench = GenEvalShapes(num_real=args.num_real)
    out = {}
    for s in seeds:
        prompts = geneval_prompts(args.eval_prompts, prompt_seed=s, exclude=train)
        base_gen = load_generator(args.model)
        base = bench.run(lambda caps: base_gen.generate(caps, 5000 + s), prompts)
        tuned_gen = load_generator(args.model)
        tuned_gen.load_lora(adapter)
        tuned = bench.run(lambda caps: tuned_gen.generate(caps, 5000 + s), prompts)
        out[f"prompt_seed_{s}"] = {"base": {k: v for k, v in base.items() if k != "per_prompt"},
                                   "adapter": {k: v for k, v in tuned.items() if k != "per_prompt"},
                                   "gains": _gains(base, tuned)}
    return out


def self_judge_cost(args, n_prompts: int = 32, repeats: int = 2) -> dict:
    """Candidate generation with and without part-way scoring, timed in turn in this process (CPU seconds, so other
    jobs on the machine do not bias the ratio): all K finished vs DREAM's critic after ``tau`` and only ``--keep``
    finished, on the same prompts, seeds and candidate sampler."""
    from dream.align import load_generator

    gen = load_generator(args.model, sampler=json.loads(args.candidate_sampler))
    prompts = [json.loads(x)["prompt"] for x in (Path(args.out) / "main" / "prompts.jsonl").read_text().splitlines()
               if x.strip()][:n_prompts]
    cpu = {"all_k": [], "partial": []}
    for _ in range(repeats):
        for name, keep in (("all_k", None), ("partial", args.keep)):
            t0 = time.process_time()
            gen.candidates(prompts, args.k, seed=0, keep=keep, tau=0.25)
            cpu[name].append(time.process_time() - t0)
    a, b = min(cpu["all_k"]), min(cpu["partial"])
    return {"prompts": len(prompts), "k": args.k, "keep": args.keep, "tau": 0.25, "cpu_s": cpu,
            "cpu_s_per_prompt_all_k": a / len(prompts), "cpu_s_per_prompt_partial": b / len(prompts),
            "cost_ratio_partial_over_all_k": b / a}


def main(argv=None) -> int:
    args = parse_args(argv)
    from dream.align import DreamSync

    root = Path(args.out)
    results, timings = {"settings": vars(args)}, {}
    reports = {}
    for name in args.runs:
        t0 = time.time()
        if name == "self_judge_cost":
            results["self_judge_cost"] = self_judge_cost(args)
            continue
        if name == "main":
            cfg = _config(args)
        elif name == "random_selection":
            cfg = _config(args, control="random")
            _seed_from(root / "main", root / name, ["prompts.jsonl", "eval_prompts.json", "round0", "round1/candidates",
                                                     "round1/scores.pt", "round1/generation.json"])
        elif name == "self_judge":
            cfg = _config(args, judge="self", keep=args.keep)
            _seed_from(root / "main", root / name, ["prompts.jsonl", "eval_prompts.json", "round0"])
        else:
            raise SystemExit(f"unknown run {name!r}")
        print(f"[dreamsync_shapes] {name} ...", flush=True)
        reports[name] = DreamSync(cfg, root / name, resume=True, progress=not args.quiet).run()
        timings[name + "_s"] = time.time() - t0
    main_rep = reports.get("main")
    if main_rep is not None:
        results["base"] = {k: v for k, v in main_rep["base"].items() if k != "per_prompt"}
        results.update({"rounds": _summary(main_rep)["rounds"]})
        results["gains_final_vs_base"] = _gains(main_rep["base"], main_rep["rounds"][-1]["eval"])
    for name in ("random_selection", "self_judge"):
        if name in reports:
            results[name] = _summary(reports[name])
            results[name]["gains_final_vs_base"] = _gains(reports[name]["base"], reports[name]["rounds"][-1]["eval"])
    if main_rep is not None and main_rep.get("final_adapter"):
        adapter = root / "main" / main_rep["final_adapter"]
        if not args.smoke:
            dst = Path(args.adapter_dir)
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(adapter, dst)
            adapter = dst
            results["adapter"] = str(dst.relative_to(REPO)) if dst.is_relative_to(REPO) else str(dst)
        t0 = time.time()
        results["reproduction"] = reproduce(args, adapter, args.repro_seeds)
        timings["reproduction_s"] = time.time() - t0
    if "self_judge" in reports and main_rep is not None:
        gm = [e.get("generation", {}).get("seconds") for e in main_rep["rounds"]]
        gs = [e.get("generation", {}).get("seconds") for e in reports["self_judge"]["rounds"]]
        timings["generation_seconds_main"], timings["generation_seconds_self_judge_partial"] = gm, gs
    results["timings"] = timings
    results["hardware"] = f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2))
    g = results.get("gains_final_vs_base")
    if g:
        print(f"final vs base: prompt accuracy {g['prompt_accuracy']['mean']:+.3f} ±{g['prompt_accuracy']['se']:.3f}, "
              f"counting {g.get('counting', {}).get('mean', float('nan')):+.3f}, "
              f"position {g.get('position', {}).get('mean', float('nan')):+.3f}; results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
