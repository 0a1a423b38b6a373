"""Distributed helpers on PyTorch's own stack (torchrun + DDP; gloo on CPU, NCCL on GPU).

Launch: ``torchrun --nproc_per_node N -m dream.cli train ...`` (any number of nodes). The contrastive
loss gathers embeddings from every rank with gradient (``dream.models.contrastive.gather_with_grad``);
the image-projection BatchNorms become :class:`DistributedBatchNorm1d` (global batch statistics; works on
CPU/gloo, where ``torch.nn.SyncBatchNorm`` does not).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> torch.device:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1) and pick the device."""
    want_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device or "cpu")


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


class DistributedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are computed over the global batch (all ranks), with
    gradients flowing through the reduction. State-dict compatible with ``nn.BatchNorm1d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        n_local = torch.tensor([float(x.shape[0])], device=x.device)
        stats = torch.cat([n_local, xf.sum(0), (xf * xf).sum(0)])
        stats = all_reduce(stats)
        n = stats[0]
        mean = stats[1:1 + x.shape[1]] / n
        var = (stats[1 + x.shape[1]:] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.0
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp(min=1))
            self.num_batches_tracked += 1
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` with :class:`DistributedBatchNorm1d` (weights kept)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = DistributedBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module



def shard_fsdp(model: nn.Module, mp_policy=None) -> nn.Module:
    """Shard a DREAM model with FSDP2 (``torch.distributed.fsdp.fully_shard``) for the large sizes.

    Every transformer block (encoder, decoder, text aligner, CLIP tower) becomes its own FSDP unit, then the
    root. The 0-dim ``logit_scale`` (official shape ``[]``, which FSDP2 cannot shard) stays replicated: call
    :func:`sync_replicated_grads` after ``backward``. Works with NCCL on GPU and gloo on CPU (tested)."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for blocks in (model.encoder_blocks, model.decoder_blocks, model.text_aligner, model.transformer.resblocks):
        for blk in blocks:
            fully_shard(blk, **kw)
    fully_shard(model, ignored_params={model.logit_scale}, **kw)
    return model


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP leaves replicated (``logit_scale``) over ranks."""
    if is_distributed() and model.logit_scale.grad is not None:
        dist.all_reduce(model.logit_scale.grad)
        model.logit_scale.grad /= world_size()
