"""What `dream train --resume RUN` takes from the run folder: no shard URL that runs a program unless the user
says so, and a clear error when the data source changes kind."""
import json

import pytest

from dream.cli import main
from dream.train import TrainConfig

TINY = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3}


def _cfg(**kw):
    base = dict(model="dream_test", model_overrides=TINY, text_encoder="random", batch_size=4, steps=2,
                log_every=1, ckpt_every=2, precision="fp32", lr=1e-3, warmup_steps=1, ema_decay=0.9,
                masking={"preset": "dream"}, steps_per_epoch=1, sample_prompts=())
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    from dream.data.shapes import write_shards

    return write_shards(str(tmp_path_factory.mktemp("shards")), 16, seed=0, image_size=32, shard_size=16,
                        progress=False)[0]


def test_resume_does_not_run_a_pipe_url_from_the_run_folder(tmp_path, shard):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (tmp_path / "cfg.json").write_text(json.dumps(_cfg(data=shard).to_dict()))
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(run)]) == 0
    # someone edits the shared run folder: reading the data now runs a shell command
    saved = json.loads((run / "train_config.json").read_text())
    saved["data"] = f"pipe:touch {marker} && cat {shard}"
    (run / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="run a program.*--data.*--allow-command-urls"):
        main(["train", "--resume", str(run), "--steps", "3"])
    assert not marker.exists()
    # other command-running schemes (curl, gsutil) are refused too
    saved["data"] = "https://example.com/shards/{000..009}.tar"
    (run / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="https://example.com/shards/000.tar"):
        main(["train", "--resume", str(run), "--steps", "3"])
    # the user's explicit choice is honoured: the flag, or the URL given again on the command line
    saved["data"] = f"pipe:touch {marker} && cat {shard}"
    (run / "train_config.json").write_text(json.dumps(saved))
    assert main(["train", "--resume", str(run), "--steps", "3", "--allow-command-urls"]) == 0
    assert marker.exists()
    marker.unlink()
    assert main(["train", "--resume", str(run), "--steps", "4", "--data", saved["data"]]) == 0
    assert marker.exists()


def test_resume_with_another_kind_of_data_says_what_changed(tmp_path, shard):
    from dream.train.loop import Trainer

    Trainer(_cfg(data="shapes"), tmp_path).fit()
    with pytest.raises(ValueError, match="trained on data 'shapes'.*--init-from"):
        Trainer(_cfg(data=shard, steps=4), tmp_path, resume=True)
