"""Evaluation: FID / Inception Score, CLIP score, linear probe, few-shot, retrieval and
compositional checks. Import the submodules directly, e.g. ``from dream.eval.fid import FIDEvaluator``."""
