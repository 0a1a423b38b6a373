"""The public pretrained table: tags load their (sha256-checked) weights, unknown tags are named, corrupted
files are refused, and every consumer (pipeline, tokenizer, eval features) goes through the table."""
import hashlib
import json
import shutil

import pytest
import torch

import dream
from dream.models import pretrained as P
from dream.pipeline import DreamPipeline


def test_create_model_tag_equals_pipeline_model_tensor_for_tensor():
    a = dream.create_model("dream_tiny.shapes")
    b = DreamPipeline.from_pretrained("dream_tiny.shapes").model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # and the weights are the trained ones, not a fresh init of the same architecture
    fresh = dream.create_model("dream_tiny.shapes", pretrained=False)
    assert fresh.config == a.config
    assert not torch.equal(fresh.state_dict()["decoder_embed.weight"], sa["decoder_embed.weight"])


def test_unknown_tags_raise_and_list_the_known_ones():
    for bad in ("dream_tiny.bogus_tag", "dream_tnyi.shapes", "no_such_arch"):
        with pytest.raises(KeyError) as e:
            dream.create_model(bad)
        assert "dream_tiny.shapes" in str(e.value)
    with pytest.raises(KeyError, match="dream_tiny.shapes"):
        P.get_pretrained_cfg("dream_tiny.bogus")
    with pytest.raises(KeyError, match="no shipped weights"):
        dream.create_model("dream_b", pretrained=True)
    # an architecture with a shipped tag gets its default weights when pretrained=True
    m = dream.create_model("dream_tiny", pretrained=True)
    assert torch.equal(m.z_proj.weight, dream.create_model("dream_tiny.shapes").z_proj.weight)


def test_table_lists_every_shipped_file_with_its_sha256():
    for tag in P.list_pretrained(None):
        c = P.get_pretrained_cfg(tag)
        for rel, sha in c.files.items():
            data = (c.path / rel).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha, (tag, rel)
    assert P.list_pretrained() == ["dream_tiny.shapes"]
    assert "shapes_vae" in P.list_pretrained("tokenizer")
    assert dream.list_models(pretrained=True) == P.list_pretrained("pipeline")


def test_pipeline_entry_agrees_with_the_shipped_pipeline_json():
    c = P.get_pretrained_cfg("dream_tiny.shapes")
    meta = json.loads((c.path / "pipeline.json").read_text())
    assert meta["tokenizer"] == c.tokenizer and meta["text_encoder"] == c.text_encoder
    assert meta["use_padding_mask"] == c.use_padding_mask
    for k, v in c.sampler.items():
        assert meta[k] == v, k
    pipe = DreamPipeline.from_pretrained("dream_tiny.shapes")
    assert pipe.clip_denoised == c.sampler["clip_denoised"]
    assert all(pipe.sampling_defaults[k] == c.sampler[k] for k in pipe.sampling_defaults)
    # a copy of the folder is an ordinary pipeline folder and loads the same way
    assert dream.get_config("dream_tiny.shapes") == pipe.model.config


@pytest.fixture
def corrupted_assets(tmp_path, monkeypatch):
    """The package assets copied to tmp_path with one byte of the shipped model flipped."""
    root = tmp_path / "assets"
    shutil.copytree(P.ASSETS, root)
    f = root / "dream_tiny_shapes" / "model" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(P, "ASSETS", root)
    return f


def test_a_corrupted_shipped_file_fails_its_sha256_check(corrupted_assets):
    with pytest.raises(P.PretrainedFileError) as e:
        dream.create_model("dream_tiny.shapes")
    msg = str(e.value)
    assert "corrupted" in msg and str(corrupted_assets) in msg and "sha256" in msg
    with pytest.raises(P.PretrainedFileError):
        DreamPipeline.from_pretrained("dream_tiny.shapes")
    # other entries are unaffected
    from dream.models.tokenizers import create_tokenizer

    assert create_tokenizer("shapes_vae").token_dim == 16


def test_a_missing_shipped_file_is_named(tmp_path, monkeypatch):
    root = tmp_path / "assets"
    shutil.copytree(P.ASSETS, root)
    (root / "shapes_vae" / "model.safetensors").unlink()
    monkeypatch.setattr(P, "ASSETS", root)
    from dream.models.tokenizers import create_tokenizer

    with pytest.raises(P.PretrainedFileError, match="missing.*model.safetensors"):
        create_tokenizer("shapes_vae")
