"""LoRA in use: ``DreamPipeline.load_lora`` (stacked, weighted, fused), ``dream sample --lora PATH[:WEIGHT]`` and
``dream eval ... --lora PATH``. Reference: the base model with the weights changed by plain math,
W + w (alpha / r) B A, from the source adapter's tensors."""
from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from lora_helpers import randomize_adapters, rel_err

import dream
from dream.adapters import add_lora, save_lora
from dream.adapters.runtime import is_lora_layer
from dream.models.tokenizers import PixelTokenizer
from dream.pipeline import DreamPipeline

PIX = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3,
       "num_sampling_steps": "5"}
PROMPTS = ["a red square", "two blue circles"]


def _base():
    torch.manual_seed(0)
    m = dream.create_model("dream_test", **PIX)
    with torch.no_grad():
        for p in m.diffloss.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _adapter(tmp_path, name, targets, rank, alpha, seed, fmt="peft"):
    """An adapter with random A and B saved as ``fmt``; returns (path, {layer: (alpha / r) B A})."""
    src = _base()
    add_lora(src, rank, alpha, targets=targets)
    randomize_adapters(src, std=0.2, seed=seed)
    deltas = {n: m.get_delta_weight("default").detach().clone() for n, m in src.named_modules() if is_lora_layer(m)}
    return save_lora(src, tmp_path / name, format=fmt), deltas


def _plain(deltas_and_weights):
    m = _base()
    with torch.no_grad():
        for deltas, w in deltas_and_weights:
            for n, d in deltas.items():
                m.get_submodule(n).weight.add_(w * d)
    return m


def _pipe(model):
    return DreamPipeline(model, PixelTokenizer(8, 32), text_encoder="random")


def _gen(pipe, seed=3):
    return pipe.generate(PROMPTS, num_iter=3, seed=seed)


def test_pipeline_load_lora_stacks_with_weights_and_fuses(tmp_path):
    pa, da = _adapter(tmp_path, "a", "decoder_attn+diffloss", 4, 8.0, seed=1)
    pb, db = _adapter(tmp_path, "b.safetensors", "decoder", 2, 3.0, seed=2, fmt="kohya")
    ref = _gen(_pipe(_plain([(da, 0.7), (db, 1.5)])))
    base = _gen(_pipe(_base()))
    assert rel_err(ref, base) > 1e-2

    pipe = _pipe(_base())
    assert pipe.load_lora(pa, weight=0.7) == "a"
    assert pipe.load_lora(pb, weight=1.5) == "b"
    unfused = _gen(pipe)
    assert rel_err(unfused, ref) <= 1e-3
    fused_pipe = _pipe(copy.deepcopy(pipe.model))
    from dream.adapters import merge_lora

    merge_lora(fused_pipe.model, unload=True)
    assert not any(is_lora_layer(m) for m in fused_pipe.model.modules())
    assert rel_err(_gen(fused_pipe), ref) <= 1e-3

    one = _pipe(_base())
    one.load_lora(pa, weight=0.7, fuse=True)                          # one adapter, fused on load
    assert not any(is_lora_layer(m) for m in one.model.modules())
    assert rel_err(_gen(one), _gen(_pipe(_plain([(da, 0.7)])))) <= 1e-3

    # a pipeline with adapters saves its fused weights: a plain pipeline folder
    pipe.save_pretrained(tmp_path / "saved")
    again = DreamPipeline.from_pretrained(tmp_path / "saved")
    assert not any(is_lora_layer(m) for m in again.model.modules())
    assert rel_err(_gen(again), ref) <= 1e-3


def test_sample_cli_lora_flags(tmp_path):
    from PIL import Image

    from dream.cli import main
    from dream.utils.images import save_images

    pa, da = _adapter(tmp_path, "a", "decoder_attn+diffloss", 4, 8.0, seed=1)
    pb, db = _adapter(tmp_path, "b.safetensors", "diffloss", 2, 3.0, seed=2, fmt="diffusers")
    _pipe(_base()).save_pretrained(tmp_path / "pipe")
    rc = main(["sample", "--model", str(tmp_path / "pipe"), *PROMPTS, "--num-iter", "3", "--seed", "3",
               "--out", str(tmp_path / "out"), "--lora", f"{pa}:0.7", "--lora", str(pb)])
    assert rc == 0
    assert json.loads((tmp_path / "out" / "samples.json").read_text())["lora"] == [f"{pa}:0.7", str(pb)]
    api = DreamPipeline.from_pretrained(tmp_path / "pipe")
    api.load_lora(pa, weight=0.7)
    api.load_lora(pb, fuse=True)
    paths = save_images(_gen(api), tmp_path / "api")
    for p in paths:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "out" / p.name))), p.name
    base_paths = save_images(_gen(DreamPipeline.from_pretrained(tmp_path / "pipe")), tmp_path / "base")
    assert any(p.read_bytes() != (tmp_path / "out" / p.name).read_bytes() for p in base_paths)
    with pytest.raises(SystemExit, match="no LoRA found in folder"):
        main(["sample", "--model", str(tmp_path / "pipe"), "x", "--out", str(tmp_path / "o2"),
              "--lora", str(tmp_path / "pipe")])


def test_eval_loads_lora_into_the_model_and_keys_the_cache(tmp_path):
    from dream.cli import eval as ev

    pa, da = _adapter(tmp_path, "enc", "encoder", 4, 8.0, seed=4)
    _pipe(_base()).save_pretrained(tmp_path / "pipe")
    args = argparse.Namespace(model=str(tmp_path / "pipe" / "model"), pretrained=None, device="cpu", lora=[f"{pa}:0.5"],
                              eval_command="retrieval")
    model = ev._load_model(args)
    assert not any(is_lora_layer(m) for m in model.modules())        # fused
    ref = _plain([(da, 0.5)])
    tokens = torch.randn(2, model.config.seq_len, model.config.token_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model.encode_image(tokens), ref.encode_image(tokens)) <= 1e-5
        assert rel_err(model.encode_image(tokens), _base().encode_image(tokens)) > 1e-3
    from dream.cli import build_parser

    for metric in ("retrieval", "linprobe", "fewshot", "clipscore"):
        need = {"retrieval": ["--images", "i", "--captions", "c"], "clipscore": ["--images", "i", "--captions", "c"],
                "linprobe": ["--train", "t", "--val", "v"], "fewshot": ["--data", "d"]}[metric]
        parsed = build_parser().parse_args(["eval", metric, "--model", "m", *need, "--lora", "p:0.5", "--lora", "q"])
        assert parsed.lora == ["p:0.5", "q"]
    assert ev._lora_key(argparse.Namespace(lora=[])) == {}
    key = ev._lora_key(args)["lora"]
    assert key == [[str(pa / "adapter_model.safetensors"), 0.5]]
    with pytest.raises(SystemExit, match="dream eval retrieval --lora"):
        ev._load_model(argparse.Namespace(model=str(tmp_path / "pipe" / "model"), pretrained=None, device="cpu",
                                          lora=[str(tmp_path / "missing")], eval_command="retrieval"))
