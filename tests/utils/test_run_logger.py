"""RunLogger: TensorBoard event files, the one-line notice without tensorboard, W&B calls and run-id reuse."""
import argparse
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_tensorboard
from dream.utils.run_logger import TENSORBOARD_NOTICE, WANDB_ID_FILE, RunLogger, add_arguments, options_from_args


def _hide_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_scalars_and_images_reach_the_event_file(tmp_path):
    png = tmp_path / "grid.png"
    Image.new("RGB", (12, 7), (255, 0, 0)).save(png)
    with RunLogger(tmp_path) as rl:
        assert rl.tensorboard_dir == tmp_path / "tensorboard"
        rl.log_scalars(1, {"loss": 2.5, "count": 3, "flag": True, "name": "x", "bad": float("nan")})
        rl.log_scalars(2, {"loss": 1.5})
        rl.log_image(2, "grid", png)
        rl.log_image(3, "tensor", torch.rand(3, 5, 9))
        rl.log_image(3, "gray", np.zeros((4, 6), dtype=np.uint8))
    rl.log_scalars(4, {"loss": 0.0})                   # after close: nothing, no error
    ev = read_tensorboard(tmp_path / "tensorboard")
    assert ev["scalars"] == {"loss": [(1, 2.5), (2, 1.5)], "count": [(1, 3.0)]}
    assert ev["images"] == {"grid": [(2, 12, 7)], "tensor": [(3, 9, 5)], "gray": [(3, 6, 4)]}
    with pytest.raises(ValueError, match="shape"):
        RunLogger(tmp_path / "b").log_image(0, "x", torch.zeros(2, 5, 5))


def test_without_tensorboard_auto_logs_one_notice_and_explicit_request_fails(tmp_path, monkeypatch, caplog):
    _hide_tensorboard(monkeypatch)
    with caplog.at_level(logging.INFO):
        with RunLogger(tmp_path / "a", tensorboard="auto") as rl:
            rl.log_scalars(1, {"loss": 1.0})
            rl.log_image(1, "img", torch.zeros(3, 2, 2))
            assert rl.tensorboard_dir is None and not rl.active
    assert [r.getMessage() for r in caplog.records] == [TENSORBOARD_NOTICE]
    assert not (tmp_path / "a" / "tensorboard").exists()
    with pytest.raises(ImportError, match="tensorboard"):
        RunLogger(tmp_path / "b", tensorboard=True)
    caplog.clear()
    RunLogger(tmp_path / "c", tensorboard=False).close()
    assert not caplog.records                            # off by choice: no notice


def test_wandb_gets_config_steps_images_and_the_saved_id_on_resume(tmp_path, fake_wandb):
    with RunLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="p", config={"lr": 0.1}) as rl:
        rl.log_scalars(5, {"loss": 1.0, "note": "x"})
        rl.log_image(5, "samples", torch.zeros(3, 4, 4))
    first = fake_wandb.inits[0]
    assert first["project"] == "p" and first["config"] == {"lr": 0.1} and first["resume"] == "allow"
    assert first["dir"] == str(tmp_path) and first["name"] == tmp_path.name
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first["id"]
    assert fake_wandb.logs[0] == (5, {"loss": 1.0})
    step, data = fake_wandb.logs[1]
    assert step == 5 and data["samples"].data.shape == (4, 4, 3)
    assert fake_wandb.finished == [{}]
    RunLogger(tmp_path, tensorboard=False, wandb=True, resume_step=5).close()       # resumed: same W&B run
    RunLogger(tmp_path, tensorboard=False, wandb=True).close()                      # new run: new id
    ids = [kw["id"] for kw in fake_wandb.inits]
    assert ids[1] == ids[0] and ids[2] != ids[0]
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == ids[2]
    with pytest.raises(RuntimeError):
        with RunLogger(tmp_path / "f", tensorboard=False, wandb=True):
            raise RuntimeError("training blew up")
    assert fake_wandb.finished[-1] == {"exit_code": 1}


def test_wandb_requested_but_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        RunLogger(tmp_path, wandb=True)
    assert not (tmp_path / "tensorboard").exists()       # failed before writing anything


def test_cli_flags(monkeypatch):
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert options_from_args(p.parse_args([])) == {"tensorboard": "auto", "wandb": False, "wandb_project": None}
    assert options_from_args(p.parse_args(["--no-tensorboard"]))["tensorboard"] is False
    assert options_from_args(p.parse_args(["--tensorboard"]))["tensorboard"] is True
    with pytest.raises(SystemExit, match="needs --wandb"):
        options_from_args(p.parse_args(["--wandb-project", "p"]))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match="`wandb` package is not installed"):
        options_from_args(p.parse_args(["--wandb"]))
    _hide_tensorboard(monkeypatch)
    with pytest.raises(SystemExit, match="`tensorboard` package is not installed"):
        options_from_args(p.parse_args(["--tensorboard"]))
    assert options_from_args(p.parse_args([]))["tensorboard"] == "auto"


def test_import_dream_imports_neither_tensorboard_nor_wandb():
    import subprocess

    code = ("import sys\nimport dream, dream.train, dream.utils.run_logger, dream.cli.train, dream.cli.train_vae\n"
            "print([m for m in ('tensorboard', 'torch.utils.tensorboard', 'wandb') if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
