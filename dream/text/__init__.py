"""Text input for DREAM.

* ``CLIPTokenizer``: the exact OpenAI CLIP byte-level BPE tokenizer (vocab 49,408, context 77) for the
  contrastive text tower; the vocabulary file is vendored from open_clip (MIT, see LICENSE_open_clip.txt).
* ``HFTextEncoder`` / ``CachedTextEncoder`` / ``text_conditioner_from_name``: frozen local Hugging Face text
  encoders (T5, MiniLM, ...) that produce the decoder's conditioning features. ``transformers`` is only
  imported when an encoder is built.
"""
from .clip_tokenizer import CLIPTokenizer
from .conditioner import CachedTextEncoder, HFTextEncoder, text_conditioner_from_name

__all__ = ["CLIPTokenizer", "HFTextEncoder", "CachedTextEncoder", "text_conditioner_from_name"]
