"""Self-healing run folders: a full disk says so and leaves no debris, stale temporary files are removed at start,
and --resume falls back to the newest checkpoint that loads."""
import errno
import logging
import os

import pytest
import torch

from dream.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

from helpers import tiny_train_config as _cfg


def _full_disk(tmp_path, monkeypatch, step):
    """The next checkpoint write of this process hits a full disk: its temporary file is /dev/full (the kernel
    answers ENOSPC), or, where there is no /dev/full, torch.save writes a little and fails with ENOSPC."""
    tmp = tmp_path / f"checkpoint-{step:08d}.pt.tmp{os.getpid()}"
    if os.path.exists("/dev/full"):
        os.symlink("/dev/full", tmp)
        return

    def failing(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing)


def test_a_full_disk_says_disk_full_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, 1)
    _full_disk(tmp_path, monkeypatch, 2)
    with pytest.raises(OSError, match="disk full") as info:
        save_checkpoint({"step": 2, "w": torch.zeros(4096)}, tmp_path, 2)
    assert info.value.errno == errno.ENOSPC and "checkpoint-00000002.pt" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.pt"]
    assert torch.equal(load_checkpoint(tmp_path)["w"], torch.ones(3))


def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path):
    from dream.train.loop import Trainer

    Trainer(_cfg(steps=2, ckpt_every=2), tmp_path).fit()
    debris = [tmp_path / "checkpoint-00000004.pt.tmp4242", tmp_path / "metrics.jsonl.tmp4242",
              tmp_path / "model" / "model.safetensors.tmp"]
    for p in debris:
        p.write_bytes(b"x" * 1000)
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    t = Trainer(_cfg(steps=3, ckpt_every=2), tmp_path, resume=True)
    assert not [p for p in debris if p.exists()] and keep.exists()
    assert t.step == 2


def test_resume_skips_a_truncated_or_non_finite_newest_checkpoint_and_says_why(tmp_path, caplog):
    from dream.train.loop import Trainer

    Trainer(_cfg(steps=6, ckpt_every=2, keep_ckpts=3), tmp_path).fit()
    c2, c4, c6 = list_checkpoints(tmp_path)
    data = c6.read_bytes()
    c6.write_bytes(data[: len(data) // 2])                    # the newest was cut short by a crash
    st = load_checkpoint(c4)
    st["model"]["z_proj.weight"][0, 0] = float("nan")         # and the one before holds NaN weights
    torch.save(st, c4)
    with caplog.at_level(logging.WARNING, logger="dream.train"):
        t = Trainer(_cfg(steps=6, ckpt_every=2), tmp_path, resume=True)
    assert t.step == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-00000006.pt" in text and "checkpoint-00000004.pt" in text and "z_proj.weight" in text
    assert "using checkpoint-00000002.pt" in text
    for p in (c4, c6):
        p.unlink()
    p2 = tmp_path / "checkpoint-00000002.pt"
    p2.write_bytes(p2.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="no checkpoint .* loads: checkpoint-00000002.pt"):
        Trainer(_cfg(steps=6, ckpt_every=2), tmp_path, resume=True)
