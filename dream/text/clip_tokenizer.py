"""Exact OpenAI CLIP byte-level BPE tokenizer (contrastive text tower input).

Re-implemented from the description of the CLIP tokenizer (Radford et al., 2021, arXiv 2103.00020) and
the behaviour of the reference ``SimpleTokenizer`` (OpenAI CLIP / open_clip). The merges file
``bpe_simple_vocab_16e6.txt.gz`` is vendored from the MIT-licensed ``open_clip_torch`` 3.3.0 wheel (see
``LICENSE_open_clip.txt`` next to this file); ``open_clip`` is not needed at run time.

Vocabulary (49,408 ids):

* ids 0..255: the 256 byte symbols of the standard byte-to-unicode table (GPT-2 / CLIP),
* ids 256..511: the same symbols with the end-of-word marker ``</w>``,
* ids 512..49,405: one token per merge, merges lines 1..48,894 of the file (line 0 is a header),
* 49,406 ``<start_of_text>`` (SOT) and 49,407 ``<end_of_text>`` (EOT).

Text clean-up is open_clip's ``lower`` clean-up (open_clip ``tokenizer.py``, mlfoundations/open_clip; OpenAI
CLIP's ``simple_tokenizer.py`` does the same): ``whitespace_clean(basic_clean(text)).lower()``, where
``basic_clean`` is ``ftfy.fix_text`` with its default settings (mojibake repair, curly quotes and Latin
ligatures straightened, full-width forms folded, control characters removed, NFC), then HTML un-escaping
twice, then stripping; ``whitespace_clean`` joins the ``str.split()`` words with single spaces. ``ftfy``
(Robyn Speer, rspeer/python-ftfy) is a core dependency; the ids equal open_clip's ``tokenize`` for every
string (tested on a seeded fuzz set of more than 5,000 strings).

The special tokens are spelled as in open_clip, ``<start_of_text>`` and ``<end_of_text>`` (OpenAI's vocab
files call them ``<|startoftext|>`` / ``<|endoftext|>``; same ids). Like open_clip, these two literal strings
inside a caption (in any case, since the text is lower-cased) become the special ids, and OpenAI's spelling
is ordinary text.

Batch tokenization (``__call__``) follows open_clip: ``[SOT] + ids + [EOT]``, zero padding to
``context_length``, and a row longer than ``context_length`` is cut to that length with its last id set to
EOT. (open_clip also accepts ``context_length`` 0, meaning its default, and 1, giving ``[EOT]``; here both are
errors, a context must hold SOT and EOT.)
"""
from __future__ import annotations

import gzip
import html
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["CLIPTokenizer", "bytes_to_unicode", "basic_clean", "whitespace_clean", "default_bpe_path"]

# Number of merges used by CLIP: 49152 BPE tokens - 256 byte symbols - 2 (historic off-by-two of the
# reference; the vocabulary then has 512 + 48894 + 2 = 49408 entries).
NUM_MERGES = 49152 - 256 - 2
SOT_TEXT = "<start_of_text>"  # open_clip's spelling
EOT_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
_BPE_CACHE_MAX = 200_000  # cached pre-tokens before the cache is cleared

# The CLIP pre-tokenizer: special tokens, English contractions, runs of letters, single digits, runs of
# anything that is neither whitespace, letter nor digit. Needs the third-party `regex` package for \p{..}.
_PRETOKENIZE_PATTERN = (
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def default_bpe_path() -> Path:
    """Path of the vendored CLIP merges file ``bpe_simple_vocab_16e6.txt.gz``."""
    return Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """The standard reversible byte -> printable unicode character table of GPT-2 / CLIP.

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves; the remaining 68 bytes (control characters, space, ``\\xa0``, soft hyphen) map, in
    increasing byte order, to code points 256, 257, ... The dict's insertion order (printable bytes
    first, then the others) defines token ids 0..255.

    Returns:
        Dict from byte value (0..255) to a one-character string.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _fix_text():
    """``ftfy.fix_text``, imported on first use (``import dream`` does not need ftfy)."""
    try:
        from ftfy import fix_text
    except ImportError as e:
        raise ImportError(
            "the CLIP tokenizer cleans text with ftfy, as open_clip and OpenAI CLIP do: pip install 'ftfy>=6.1'"
        ) from e
    return fix_text


def basic_clean(text: str) -> str:
    """open_clip's ``basic_clean``: ``ftfy.fix_text`` (default settings), ``html.unescape`` twice, strip.

    Args:
        text: raw caption.

    Returns:
        Cleaned caption (case preserved).
    """
    text = _fix_text()(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace (``str.split()``'s notion, Unicode-aware) to one space; strip."""
    return " ".join(text.split())


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Read merges lines 1..NUM_MERGES (line 0 is a header) of a CLIP merges file (.txt or .txt.gz)."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    body = lines[1 : NUM_MERGES + 1]
    if len(body) < NUM_MERGES:
        raise ValueError(
            f"CLIP BPE merges file {path} has {len(body)} merge lines after the header; "
            f"at least {NUM_MERGES} are needed"
        )
    merges = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"CLIP BPE merges file {path}, line {n}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """OpenAI CLIP byte-level BPE tokenizer (vocab 49,408, context 77 by default).

    Args:
        bpe_path: CLIP merges file (``.txt`` or ``.txt.gz`` with one header line); ``None`` loads the
            vendored ``bpe_simple_vocab_16e6.txt.gz``.
        context_length: default context length of ``__call__``.

    Example:
        >>> tok = CLIPTokenizer.from_default()
        >>> tok.encode("a photo of a cat")
        [320, 1125, 539, 320, 2368]
        >>> tok(["a photo of a cat"]).shape
        torch.Size([1, 77])
    """

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = 77):
        try:
            import regex
        except ImportError as e:  # pragma: no cover - regex ships with transformers
            raise ImportError(
                "CLIPTokenizer needs the `regex` package (Unicode \\p{L}/\\p{N} classes): pip install regex"
            ) from e
        _fix_text()  # fail at construction, not at the first caption, when ftfy is missing
        self._check_context_length(context_length)
        self.context_length = int(context_length)
        self.bpe_path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
        merges = _read_merges(self.bpe_path)

        byte_encoder = bytes_to_unicode()
        symbols = list(byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges]
        vocab += [SOT_TEXT, EOT_TEXT]
        self._tokens: list[str] = vocab
        self._encoder: dict[str, int] = {t: i for i, t in enumerate(vocab)}
        if len(self._encoder) != len(vocab):
            raise ValueError(f"CLIP BPE merges file {self.bpe_path} produces duplicate vocabulary entries")
        self._ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        # Byte-encoding via str.translate on the latin-1 view of the UTF-8 bytes.
        self._byte_table = {b: c for b, c in byte_encoder.items()}
        inverse = {ord(c): chr(b) for b, c in byte_encoder.items()}
        # Per-id decoded bytes; "</w>" becomes a space (a plain space is never a byte symbol).
        self._decode_bytes: list[bytes] = []
        for tok in vocab:
            if tok in (SOT_TEXT, EOT_TEXT):
                self._decode_bytes.append(tok.encode("utf-8"))
                continue
            eow = tok.endswith(END_OF_WORD)
            body = tok[: -len(END_OF_WORD)] if eow else tok
            raw = body.translate(inverse).encode("latin-1") + (b" " if eow else b"")
            self._decode_bytes.append(raw)
        self._pattern = regex.compile(_PRETOKENIZE_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._reset_cache()

    # ------------------------------------------------------------------ constructors / properties

    @classmethod
    def from_default(cls, context_length: int = 77) -> "CLIPTokenizer":
        """Tokenizer over the vendored CLIP vocabulary (``bpe_simple_vocab_16e6.txt.gz``)."""
        return cls(None, context_length=context_length)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49,408 for the CLIP vocabulary)."""
        return len(self._tokens)

    @property
    def sot_token_id(self) -> int:
        """Id of ``<start_of_text>`` (49,406)."""
        return self._encoder[SOT_TEXT]

    @property
    def eot_token_id(self) -> int:
        """Id of ``<end_of_text>`` (49,407)."""
        return self._encoder[EOT_TEXT]

    @property
    def pad_token_id(self) -> int:
        """Padding id used by ``__call__`` (0, as in open_clip)."""
        return 0

    def get_vocab(self) -> dict[str, int]:
        """Copy of the token-string -> id table."""
        return dict(self._encoder)

    # ------------------------------------------------------------------ BPE

    def _reset_cache(self) -> None:
        self._cache = {SOT_TEXT: (self.sot_token_id,), EOT_TEXT: (self.eot_token_id,)}

    def _bpe(self, pretoken: str) -> tuple[int, ...]:
        """Ids of one pre-token (a regex match of the cleaned, lower-cased text); cached."""
        cached = self._cache.get(pretoken)
        if cached is not None:
            return cached
        symbols = pretoken.encode("utf-8").decode("latin-1").translate(self._byte_table)
        word = list(symbols[:-1]) + [symbols[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(word) > 1:
            # Lowest-rank adjacent pair; then merge all its non-overlapping occurrences left to right.
            best, best_rank = None, NUM_MERGES
            for pair in zip(word[:-1], word[1:]):
                r = ranks.get(pair, NUM_MERGES)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = tuple(self._encoder[w] for w in word)
        if len(self._cache) >= _BPE_CACHE_MAX:
            self._reset_cache()
        self._cache[pretoken] = ids
        return ids

    # ------------------------------------------------------------------ public API

    def clean(self, text: str) -> str:
        """The reference clean-up: ``whitespace_clean(basic_clean(text)).lower()``."""
        return whitespace_clean(basic_clean(text)).lower()

    def pretokenize(self, text: str) -> list[str]:
        """Pre-tokens of the cleaned text (regex matches), before byte encoding and BPE."""
        return self._pattern.findall(self.clean(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT.

        The literal strings ``<start_of_text>`` / ``<end_of_text>`` inside ``text`` (any case) map to the
        special ids, as in open_clip.

        Args:
            text: a caption.

        Returns:
            List of ids in ``[0, vocab_size)``.
        """
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for pretoken in self.pretokenize(text):
            ids.extend(self._bpe(pretoken))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids.

        Each ``</w>`` becomes a space, invalid UTF-8 is replaced by U+FFFD and the result is stripped.
        With ``skip_special_tokens`` SOT ids are dropped and decoding stops at the first EOT (so a padded
        row from ``__call__`` decodes to its caption).

        Args:
            ids: 1-D sequence / tensor of ids.
            skip_special_tokens: drop SOT and stop at EOT; otherwise special tokens are written out.

        Returns:
            The decoded string.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out: list[bytes] = []
        sot, eot, n = self.sot_token_id, self.eot_token_id, self.vocab_size
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")
            if skip_special_tokens:
                if i == eot:
                    break
                if i == sot:
                    continue
            out.append(self._decode_bytes[i])
        return b"".join(out).decode("utf-8", errors="replace").strip()

    def batch_decode(self, ids: torch.Tensor | Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """``decode`` applied to every row of a (B, L) tensor or an iterable of id sequences."""
        if isinstance(ids, torch.Tensor) and ids.dim() != 2:
            raise ValueError(f"batch_decode expects a 2-D tensor of ids, got shape {tuple(ids.shape)}")
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    @staticmethod
    def _check_context_length(context_length: int) -> None:
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize a caption or a batch of captions for the CLIP text tower.

        Args:
            texts: a string or a list of strings.
            context_length: output length; defaults to ``self.context_length`` (77).

        Returns:
            LongTensor (B, context_length): ``[SOT, ids..., EOT, 0, 0, ...]``. Longer captions are cut to
            ``context_length`` tokens and the last one is set to EOT (open_clip's rule).
        """
        ctx = self.context_length if context_length is None else context_length
        self._check_context_length(ctx)
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIPTokenizer expects a str or a list/tuple of str")
        sot, eot = self.sot_token_id, self.eot_token_id
        rows = []
        for text in texts:
            ids = [sot] + self.encode(text) + [eot]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = eot
            rows.append(ids + [0] * (ctx - len(ids)))
        if not rows:
            return torch.zeros(0, ctx, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)  # (B, ctx)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
