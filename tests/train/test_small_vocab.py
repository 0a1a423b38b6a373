"""`dream train --model dream_test` trains on real captions: CLIP BPE ids are folded into a text tower's smaller
vocabulary (dream_test keeps the official parity fixture's 100 ids)."""
import json

import torch

from dream.cli import main

PIXELS = {"img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3}


def test_dream_train_model_dream_test_trains_on_real_captions(tmp_path):
    from dream.models.registry import get_config

    assert get_config("dream_test").clip_vocab_size == 100        # the parity fixture's layout is unchanged
    rc = main(["train", "--model", "dream_test", "--text-encoder", "random",
               "--set", f"model_overrides={json.dumps(PIXELS)}", "--steps", "2", "--batch-size", "4",
               "--precision", "fp32", "--log-every", "1", "--out", str(tmp_path / "run")])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["clip_loss"] > 0 for r in rows)


def test_clip_ids_fold_into_a_small_vocabulary_keeping_pad_and_eot():
    from dream.text.inputs import TextInputs, fold_clip_ids

    big = TextInputs("random", 32, 8, 12)
    small = TextInputs("random", 32, 8, 12, clip_vocab_size=100)
    texts = ["a red circle", "two blue squares next to a large green triangle and more words"]
    ids, folded = big.clip_ids(texts), small.clip_ids(texts)
    assert int(ids.max()) >= 100 and 0 <= int(folded.min()) and int(folded.max()) == 99
    assert torch.equal(folded.argmax(-1), ids.argmax(-1))      # the tower pools at the same (EOT) position
    assert torch.equal(folded == 0, ids == 0) and torch.equal(folded[:, 0], torch.full((2,), 98))
    assert torch.equal(fold_clip_ids(ids, 49408), ids)
