"""Training: trainer, optimiser groups and LR schedules, EMA, atomic checkpoints, distributed helpers."""
from .checkpoint import latest_checkpoint as latest_checkpoint
from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import save_checkpoint as save_checkpoint
from .config import TrainConfig as TrainConfig
from .ema import EMA as EMA
from .optim import LRSchedule as LRSchedule
from .optim import build_optimizer as build_optimizer
from .optim import param_groups as param_groups


def __getattr__(name):
    if name == "Trainer":
        from .loop import Trainer

        return Trainer
    raise AttributeError(name)
