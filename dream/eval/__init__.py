"""Evaluation: FID / Inception Score, CLIP score, linear probe, few-shot, retrieval and
compositional checks. Import the submodules directly, e.g. ``from dream.eval.fid import FIDEvaluator``."""
from .clipscore import DreamCLIPScore as DreamCLIPScore
from .clipscore import dream_clip_score as dream_clip_score
from .clipscore import hf_clip_score as hf_clip_score
from .compositional import Verifier as Verifier
from .fewshot import few_shot_eval as few_shot_eval
from .fid import FIDEvaluator as FIDEvaluator
from .fid import frechet_distance as frechet_distance
from .fid import inception_score as inception_score
from .inception import FIDInceptionV3 as FIDInceptionV3
from .inception import load_fid_inception as load_fid_inception
from .linear_probe import LARS as LARS
from .linear_probe import fit_logistic_regression as fit_logistic_regression
from .linear_probe import knn_accuracy as knn_accuracy
from .linear_probe import linear_probe as linear_probe
from .retrieval import retrieval_recall as retrieval_recall
from .shapes_features import load_shapes_feature_extractor as load_shapes_feature_extractor
