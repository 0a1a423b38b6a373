"""Trainer: exact resume, atomic checkpoints, 2-process gloo == 1 process, dream train end to end."""
import json
import os
import sys

import pytest
import torch

import dream
from tolerance import assert_rel_close, gemm_rel_tol
from dream.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

from helpers import TINY, tiny_train_config as _cfg


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_exact(tmp_path):
    from dream.train.loop import Trainer

    full = Trainer(_cfg(steps=4, ckpt_every=0), tmp_path / "full")
    full.fit()
    a = Trainer(_cfg(steps=2, ckpt_every=2), tmp_path / "part")
    a.fit()
    # the stopped run had logged a step past its last checkpoint: resume must not keep that line
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0, "elapsed_s": 1.0}) + "\n")
    b = Trainer(_cfg(steps=4, ckpt_every=2), tmp_path / "part", resume=True)
    assert b.step == 2
    b.fit()
    part = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in part] == [1, 2, 3, 4] and all(r["loss"] != 123.0 for r in part)
    el = [r["elapsed_s"] for r in part]
    assert el == sorted(el) and el[2] > el[1]          # elapsed_s counts on across the resume
    wf, wb = _weights(full), _weights(b)
    for k in wf:                                       # resume is bit-exact: the same ops on the same state
        assert torch.equal(wb[k], wf[k]), k
    for k, v in full.ema.state_dict().items():
        assert torch.equal(b.ema.state_dict()[k], v), k
    # the run changed the weights at all, and recorded the masking schedule / metrics
    init = dream.create_model("dream_test", **TINY).state_dict()
    assert any(not torch.equal(init[k], wf[k]) for k in wf if k in init)
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"loss", "diff_loss", "clip_loss", "mask_ratio", "lr"} <= set(json.loads(lines[0]))
    assert (tmp_path / "full" / "loss.png").exists()
    # exported weights load through create_model
    m = dream.create_model(tmp_path / "full" / "model")
    assert torch.equal(m.state_dict()["z_proj.weight"], wf["z_proj.weight"])


def test_checkpoint_write_killed_midway_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, 1)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000001.pt"
    assert torch.equal(load_checkpoint(tmp_path)["w"], torch.ones(3))
    for s in (2, 3, 4, 5):
        save_checkpoint({"step": s}, tmp_path, s, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000004.pt", "checkpoint-00000005.pt"]
    assert not list(tmp_path.glob("*.tmp*"))


def _ddp_worker(rank, world, port, batch, out_dir, fsdp=False):
    import torch.distributed as dist

    from dream.train.distributed import convert_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = dream.create_model("dream_test", attn_dropout=0.0, proj_dropout=0.0)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    convert_batchnorm(model)
    if fsdp:
        from dream.train.distributed import shard_fsdp

        ddp = shard_fsdp(model)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    sl = slice(rank * batch, (rank + 1) * batch)
    mul, L = model.config.diffusion_batch_mul, model.config.seq_len
    t = torch.load(os.path.join(out_dir, "inputs.pt"))
    out = ddp(t["tokens"][sl], t["ids"][sl], t["feats"][sl], t["mask"][sl],
              diff_t=t["diff_t"].view(mul, -1, L)[:, sl].reshape(-1),
              diff_noise=t["diff_noise"].view(mul, -1, L, t["tokens"].shape[-1])[:, sl].reshape(-1, t["tokens"].shape[-1]))
    out["loss"].backward()
    grads = {}
    if fsdp:
        from dream.train.distributed import sync_replicated_grads

        sync_replicated_grads(model)
    for n, p in model.named_parameters():
        g = p.grad
        grads[n] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    if rank == 0:
        torch.save({"loss": out["loss"].detach(), "clip": out["clip_loss"].detach(), "grads": grads},
                   os.path.join(out_dir, "ddp.pt"))
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, out["loss"].detach())
    if rank == 0:
        torch.save(torch.stack(losses), os.path.join(out_dir, "losses.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process_on_concatenated_batch(tmp_path, fsdp):
    import socket

    import torch.multiprocessing as mp

    from dream.masking import mask_from_orders, sample_orders

    torch.manual_seed(0)
    model = dream.create_model("dream_test", attn_dropout=0.0, proj_dropout=0.0)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cfg, B = model.config, 3
    g = torch.Generator().manual_seed(1)
    N = 2 * B
    inputs = {"tokens": torch.randn(N, cfg.seq_len, cfg.token_dim, generator=g),
              "ids": torch.randint(1, 97, (N, cfg.clip_context_length), generator=g),
              "feats": torch.randn(N, cfg.text_max_len, cfg.text_embed_dim, generator=g),
              "mask": mask_from_orders(sample_orders(N, cfg.seq_len, generator=g),
                                       torch.tensor([10, 14, 12, 12, 12, 12])),
              "diff_t": torch.randint(0, 1000, (cfg.diffusion_batch_mul * N * cfg.seq_len,), generator=g),
              "diff_noise": torch.randn(cfg.diffusion_batch_mul * N * cfg.seq_len, cfg.token_dim, generator=g)}
    # sample 1 (14 of 16 masked) is ineligible for the contrastive loss; each rank holds 36 masked tokens, so
    # the DDP average of per-rank diffusion means (official behaviour) equals the global mean
    inputs["ids"][:, -1] = 99
    torch.save(inputs, tmp_path / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, B, str(tmp_path), fsdp), nprocs=2, join=True)
    # single process on the concatenated batch (BN in train mode uses the full-batch statistics)
    out = model(inputs["tokens"], inputs["ids"], inputs["feats"], inputs["mask"], diff_t=inputs["diff_t"],
                diff_noise=inputs["diff_noise"])
    out["loss"].backward()
    ddp = torch.load(tmp_path / "ddp.pt")
    losses = torch.load(tmp_path / "losses.pt")
    # Two processes reduce over half batches and average, one process over the whole batch: the same math in
    # another summation order. Bound: the deepest chain here (text tower, encoder, decoder, aligner, diffusion head,
    # forward and backward, ~30 reductions of length <= 256 = the MLP width) at 4 sqrt(n) u per reduction.
    tol = gemm_rel_tol(torch.float32, 256, depth=30)
    assert_rel_close(ddp["clip"], out["clip_loss"].detach(), tol, "DDP clip loss")
    # each rank's loss = its local diffusion mean + the global contrastive term; their mean is the global loss
    assert_rel_close(losses.mean(), out["loss"].detach(), tol, "DDP loss")
    # gradients as one vector (max norm over all parameters): some are exactly zero in math (a bias right before a
    # BatchNorm), so their rounding noise is only small against the gradient's overall scale
    names = [n for n, _ in model.named_parameters()]
    assert_rel_close(torch.cat([ddp["grads"][n].flatten() for n in names]),
                     torch.cat([p.grad.flatten() for _, p in model.named_parameters()]), tol, "DDP gradients")


def test_dream_train_cli_on_tiny_shards_end_to_end(tmp_path):
    from dream.data.shapes import write_shards

    shards = write_shards(str(tmp_path / "shards"), 24, seed=0, split="train", image_size=32, shard_size=8)
    assert len(shards) == 3
    cfg = _cfg(steps=3, ckpt_every=3, data=str(tmp_path / "shards" / "*.tar"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    from dream.cli import main

    pattern = str(tmp_path / "shards") + "/{" + ",".join(os.path.basename(s)[:-4] for s in sorted(shards)) + "}.tar"
    rc = main(["train", "--config", str(tmp_path / "cfg.json"), "--data", pattern, "--out", str(tmp_path / "run"),
               "--steps", "3"])
    assert rc == 0
    assert latest_checkpoint(tmp_path / "run") is not None
    m = dream.create_model(tmp_path / "run" / "model")
    assert m.config.img_size == 32
    ck = load_checkpoint(tmp_path / "run")  # weights_only load of the full training state
    assert ck["step"] == 3 and "optimizer" in ck and "rng_gen" in ck


def test_shapes_workers_render_the_same_batches_in_order_and_after_a_jump():
    from dream.train.loop import ShapesBatches

    plain = ShapesBatches({}, 32, 3, 2, 0, 1, 0)
    ahead = ShapesBatches({}, 32, 3, 2, 0, 1, 0, num_workers=2)
    for step, micro in [(0, 0), (0, 1), (1, 0), (5, 1), (6, 0)]:  # (5, 1) is out of sequence: workers restart
        a, b = plain.get(step, micro), ahead.get(step, micro)
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"], (step, micro)
    assert not torch.equal(plain.get(0, 0)["image"], plain.get(0, 1)["image"])


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_dream_train_tensorboard_matches_metrics_and_resume_has_no_duplicate_steps(tmp_path):
    from conftest import read_tensorboard
    from dream.cli import main

    run = tmp_path / "run"
    cfg = _cfg(steps=3, ckpt_every=2, sample_every=2, sample_prompts=("a red circle",), sample_num_iter=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(run)]) == 0
    ev = read_tensorboard(run / "tensorboard")
    rows = _metrics(run)
    assert set(ev["scalars"]) == set(rows[0]) - {"step"} and {"loss", "lr", "clip_loss"} <= set(ev["scalars"])
    for tag, points in ev["scalars"].items():
        assert [s for s, _ in points] == [r["step"] for r in rows], tag
        assert [v for _, v in points] == pytest.approx([r[tag] for r in rows], rel=2 ** -24), tag  # float32 events
    assert [s for s, _, _ in ev["images"]["samples"]] == [2, 3]        # in-loop grid at 2, final grid at 3
    # the run "dies" after logging step 3 but before checkpointing it; resuming from step 2 must not show 3 twice
    (run / "checkpoint-00000003.pt").unlink()
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    ev = read_tensorboard(run / "tensorboard")
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for tag in ("loss", "lr", "elapsed_s"):
        assert [s for s, _ in ev["scalars"][tag]] == [1, 2, 3, 4], tag
        assert [v for _, v in ev["scalars"][tag]] == pytest.approx([r[tag] for r in rows], rel=2 ** -24), tag  # float32 events
    assert [s for s, _, _ in ev["images"]["samples"]] == [2, 4]


def test_trainer_without_tensorboard_logs_one_notice_and_keeps_metrics(tmp_path, monkeypatch, caplog):
    import logging

    from dream.train.loop import Trainer
    from dream.utils.run_logger import TENSORBOARD_NOTICE

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.INFO):
        Trainer(_cfg(steps=2, ckpt_every=0), tmp_path).fit()
    assert [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()] == [TENSORBOARD_NOTICE]
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_dream_train_wandb_logs_every_step_and_resume_continues_the_same_run(tmp_path, fake_wandb):
    from dream.cli import main

    run = tmp_path / "run"
    cfg = _cfg(steps=2, ckpt_every=2, sample_prompts=("a red circle",), sample_num_iter=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    args = ["--no-tensorboard", "--wandb", "--wandb-project", "proj"]
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(run), *args]) == 0
    assert main(["train", "--resume", str(run), "--steps", "4", *args]) == 0
    assert not (run / "tensorboard").exists()
    a, b = fake_wandb.inits
    assert a["id"] == b["id"] and a["project"] == b["project"] == "proj" and a["config"]["steps"] == 2
    scalar_steps = [s for s, d in fake_wandb.logs if "loss" in d]
    assert scalar_steps == [1, 2, 3, 4] == [r["step"] for r in _metrics(run)]
    assert all("lr" in d and "step" not in d for s, d in fake_wandb.logs if "loss" in d)
    assert [s for s, d in fake_wandb.logs if "samples" in d] == [2, 4]
    assert len(fake_wandb.finished) == 2


def test_dream_train_and_train_vae_with_wandb_missing_name_the_package(tmp_path, monkeypatch):
    from dream.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    for cmd in ("train", "train-vae"):
        with pytest.raises(SystemExit, match="wandb"):
            main([cmd, "--out", str(tmp_path / cmd), "--wandb"])
        assert not (tmp_path / cmd).exists()
