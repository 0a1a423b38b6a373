"""Write the project's CLIP BPE vocabulary as a Hugging Face ``CLIPTokenizer`` folder.

Stable Diffusion pipelines in diffusers (huggingface/diffusers) load their tokenizer with transformers'
``CLIPTokenizer.from_pretrained`` (huggingface/transformers, ``models/clip/tokenization_clip.py``), which reads two
files: ``vocab.json`` (token string -> id) and ``merges.txt`` (a header line, then one merge per line, of which it
uses the first 48,894). Both are derived here from the vendored merges file of :mod:`dream.text.clip_tokenizer`
(OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``, Radford et al., 2021, arXiv 2103.00020), so the exported
tokenizer gives the same ids as :class:`~dream.text.clip_tokenizer.CLIPTokenizer`:

* ids 0..511: the 256 byte symbols, then the same with ``</w>``; ids 512..49,405: the merges in order;
* 49,406 / 49,407: the start / end of text tokens, spelled ``<|startoftext|>`` / ``<|endoftext|>`` as in OpenAI's
  and Hugging Face's files (open_clip and :mod:`dream.text` spell them ``<start_of_text>`` / ``<end_of_text>``:
  same ids).

Padding follows Stable Diffusion 1.x's tokenizer: the pad token is ``<|endoftext|>`` (id 49,407), not open_clip's 0.

    from dream.text.hf_export import export_clip_tokenizer
    export_clip_tokenizer("my_pipeline/tokenizer", model_max_length=77)
    # transformers.CLIPTokenizer.from_pretrained("my_pipeline/tokenizer")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from dream.text.clip_tokenizer import END_OF_WORD, NUM_MERGES, _read_merges, bytes_to_unicode, default_bpe_path

__all__ = ["clip_vocab_and_merges", "export_clip_tokenizer", "HF_SOT", "HF_EOT"]

HF_SOT = "<|startoftext|>"
HF_EOT = "<|endoftext|>"


def clip_vocab_and_merges(bpe_path: Union[str, os.PathLike, None] = None) -> tuple[dict, list]:
    """``(vocab, merges)`` of the CLIP BPE: the token -> id table (49,408 entries, special tokens in Hugging Face's
    spelling) and the 48,894 merge pairs in rank order."""
    merges = _read_merges(Path(bpe_path) if bpe_path is not None else default_bpe_path())
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [HF_SOT, HF_EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merges produce duplicate vocabulary entries")
    return vocab, merges


def export_clip_tokenizer(folder: Union[str, os.PathLike], model_max_length: int = 77,
                          bpe_path: Union[str, os.PathLike, None] = None) -> Path:
    """Write a transformers ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) for the CLIP BPE vocabulary; returns the folder.

    Args:
        folder: output folder (created).
        model_max_length: the tokenizer's context (Stable Diffusion pads every prompt to this length).
        bpe_path: merges file; default the vendored one.
    """
    if model_max_length < 2:
        raise ValueError(f"model_max_length must hold SOT and EOT (>= 2), got {model_max_length}")
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    assert len(merges) == NUM_MERGES and vocab[HF_EOT] == len(vocab) - 1
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")           # a header line: the reader skips the first line
        f.write("\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = HFCLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length,
                          bos_token=HF_SOT, eos_token=HF_EOT, unk_token=HF_EOT, pad_token=HF_EOT)
    tok.save_pretrained(str(folder))
    return folder
