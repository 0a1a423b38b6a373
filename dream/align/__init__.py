"""Alignment of text-to-image models: DreamSync (arXiv 2311.17946) and, for soft tokens, SoftREPA / AGSM.

    from dream.align import DreamSync, DreamSyncConfig
    DreamSync(DreamSyncConfig(model="dream_tiny.shapes", rounds=3, k=8), "runs/ds").run()

Modules: :mod:`~dream.align.questions` (TIFA / DSG question sets and scores), :mod:`~dream.align.judges`
(faithfulness and aesthetic judges), :mod:`~dream.align.selection`, :mod:`~dream.align.generators` (DREAM and
diffusers generators behind one protocol), :mod:`~dream.align.dreamsync` (the loop). Importing this package needs
no optional dependency; LoRA fine-tuning needs peft (``pip install 'dream[align]'``).
"""
from .dreamsync import DreamSync, DreamSyncConfig
from .generators import DreamGenerator, LoraTrainConfig, load_generator
from .judges import (DreamSelfJudge, HFVQA, LaionAestheticJudge, ShapesAestheticJudge, ShapesVQA, VQAJudge,
                     VERIFIER_VARIANTS)
from .questions import dsg_score, faithfulness, load_question_sets, shapes_question_sets, tifa_score
from .selection import SelectionConfig, random_like, select

__all__ = ["DreamSync", "DreamSyncConfig", "DreamGenerator", "LoraTrainConfig", "load_generator", "DreamSelfJudge",
           "HFVQA", "LaionAestheticJudge", "ShapesAestheticJudge", "ShapesVQA", "VQAJudge", "VERIFIER_VARIANTS",
           "dsg_score", "faithfulness", "load_question_sets", "shapes_question_sets", "tifa_score",
           "SelectionConfig", "random_like", "select"]
