"""Train a CTC head on frozen Whisper states: the CTC posteriors TASU needs from an encoder without one.

Every clip is encoded once by the frozen :class:`WhisperSpeechEncoder` (real length, the one mode used
everywhere) and its states are cached on disk; the head (:class:`CTCHead`) is then trained on the cached
states with CTC and scored by greedy decoding on held-out voices. Outputs::

    <out>/head.safetensors, head.json    CTCHead.save (what `encoder.ctc_head` points at)
    <out>/report.json                    units, settings, clips per training source, eval CER/WER, examples,
                                         per-epoch history
    <cache>/<manifest>-<hash>.safetensors  the frozen states of one manifest (default cache: <out>/../ctc-features)
    <cache>/<manifest>-<hash>-aug<k>-<hash>.safetensors  those of its augmented copy k (per seed and settings)

SpecAugment on the cached states cannot make TTS voices sound like people in rooms and on phones, so
``--augment-copies N`` (default 0) also trains on N waveform-augmented copies of every training clip
(:func:`speechllm.augment.augment_seeded` with every transform possible, seeded by clip, copy and
``--seed``), each encoded once and cached like the clean states; ``--extra-train`` adds more speech
(e.g. ``prepare real-speech``'s recordings), clean and augmented alike. Targets are the clip's text.

Units: ``chars`` (blank, space, a-z, apostrophe), or the LLM tokenizer's most frequent tokens in the
text corpus plus those characters (``llm``: ~1500 tokens, ``hybrid``: a few hundred). Training targets
always come from :meth:`CTCVocabulary.encode` (which normalises first), exactly what the text side
can compute, never from the LLM tokenizer. Re-running with the same settings returns the saved report.

    python -m stages prepare ctc-head --train data/demo/speech/train.jsonl --eval data/demo/speech/dev.jsonl \
        --text data/demo/text/train.jsonl --out .cache/assets/ctc-head-whisper-tiny.en [--units llm|chars|hybrid]

Default ``llm`` units: on the demo data (1,454 clips, 8 epochs, held-out voices) they gave the lowest
WER (0.47 vs 0.51 for chars) with ~1 unit per word instead of ~5, the length TASU's LLM should see;
``chars`` keep more of what was said in rare words (CER 0.17 vs 0.34: LLM units delete them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from speechllm.augment import AugmentConfig, augment_seeded
from speechllm.encoders.base import pad_sequences
from speechllm.encoders.ctc import CTCHead, CTCVocabulary
from speechllm.encoders.whisper import WhisperSpeechEncoder
from speechllm.io import atomic_folder, atomic_write
from speechllm.manifest import Utterance, load_audio, load_manifest
from speechllm.metrics import corpus_errors, normalize

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
BLANK = "<blank>"
CHARS = (" ", *"abcdefghijklmnopqrstuvwxyz", "'")
_CHAR_VOCABULARY = CTCVocabulary([BLANK, *CHARS], blank_id=0)
UNIT_KINDS = ("chars", "hybrid", "llm")
DEFAULT_MAX_UNITS = {"chars": 0, "hybrid": 400, "llm": 1500}
HEAD_FILES = ("head.json", "head.safetensors", "report.json")

_TOKEN_UNIT = re.compile(r" ?[a-z']{2,}| [a-z']")  # a subword, with at most a leading space
_DIGIT = re.compile(r"\d")


def normalize_ctc_text(text: str) -> str:
    """The text the CTC units spell: lower-case a-z and in-word apostrophes, single spaces.

    Anything else (punctuation, hyphens, digits) becomes a word break: it is silent or, for digits,
    spoken as words the units cannot spell. Every unit set here spells exactly these characters, so
    this is :meth:`CTCVocabulary.normalize` of each, which the text side (CPS) applies too.
    """
    return _CHAR_VOCABULARY.normalize(text)


# ---------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------


def build_units(kind: str, texts: list[str], llm_dir: str | Path | None = None,
                max_units: int | None = None) -> tuple[list[str], list[int | None]]:
    """The CTC units (index 0 = blank) and, per unit, its LLM token id (None where it has none).

    ``llm``/``hybrid``: the ``max_units`` LLM tokens most frequent in ``texts`` (normalised), each as its
    decoded text (byte-level BPE: " the" keeps its space), after every character as the fallback.
    """
    if kind not in UNIT_KINDS:
        raise ValueError(f"unknown units {kind!r}; choose from {', '.join(UNIT_KINDS)}")
    units = [BLANK, *CHARS]
    if kind == "chars":
        return units, [None] * len(units)
    if llm_dir is None:
        raise ValueError(f"units={kind!r} needs llm_dir (the LLM whose tokenizer gives the units)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    max_units = DEFAULT_MAX_UNITS[kind] if max_units is None else max_units
    counts: Counter[int] = Counter()
    for ids in tokenizer([normalize_ctc_text(t) for t in texts], add_special_tokens=False).input_ids:
        counts.update(ids)

    def single_id(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    token_ids = [None, *(single_id(c) for c in CHARS)]
    seen = set(units)
    for token_id, _ in counts.most_common():
        if len(units) - 1 - len(CHARS) >= max_units:
            break
        text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        if text not in seen and _TOKEN_UNIT.fullmatch(text):
            units.append(text)
            token_ids.append(token_id)
            seen.add(text)
    return units, token_ids


# ---------------------------------------------------------------------------------------------------
# Frozen features, cached per manifest
# ---------------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Frozen encoder states of one manifest; clip ``i`` is ``feats[offsets[i] : offsets[i] + lengths[i]]``."""

    ids: list[str]
    feats: torch.Tensor  # (sum of lengths, D), float16 on disk and in memory
    lengths: torch.Tensor  # (N,)
    offsets: torch.Tensor | None = None  # (N,), default: clips stored back to back

    def __post_init__(self) -> None:
        if self.offsets is None:
            self.offsets = torch.cumsum(self.lengths, 0) - self.lengths

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> Features:
        """Some of the clips, sharing this one's feature tensor."""
        return Features([self.ids[i] for i in indices], self.feats, self.lengths[indices], self.offsets[indices])

    def clip(self, i: int) -> torch.Tensor:
        return self.feats[self.offsets[i] : self.offsets[i] + self.lengths[i]]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_sequences([self.clip(i).float() for i in indices])


class FeatureSet:
    """Several :class:`Features` as one (clean and augmented copies of several manifests), without
    copying their tensors: clip ``i`` of the set is a clip of the part it falls in."""

    def __init__(self, parts: list[Features]) -> None:
        self.parts = parts
        self.ids = [clip_id for part in parts for clip_id in part.ids]
        self.lengths = torch.cat([part.lengths for part in parts])
        self._where = [(k, i) for k, part in enumerate(parts) for i in range(len(part))]

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_sequences([self.parts[k].clip(i).float() for k, i in map(self._where.__getitem__, indices)])


def _file_key(path: Path) -> dict:
    """What identifies a file's content: a hash for manifests and configs (data preparation rewrites
    them unchanged on every run, which must not retrain the head), size and time for big weights."""
    stat = path.stat()
    if stat.st_size < 50 * 2**20:
        return {"path": str(path.resolve()), "sha1": hashlib.sha1(path.read_bytes()).hexdigest()}
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def whisper_key(whisper_dir: str | Path) -> dict:
    """What identifies the encoder's weights: its folder and its config/weights files."""
    folder = Path(whisper_dir)
    return {"dir": str(folder.resolve()),
            "files": [_file_key(p) for p in sorted(folder.glob("*")) if p.suffix in (".json", ".safetensors")]}


def augment_settings(cfg: AugmentConfig | None = None) -> dict:
    """The augmentation of the training copies as plain data (default: every transform possible)."""
    return asdict(cfg if cfg is not None else AugmentConfig(prob=1.0))


def augment_seed(seed: int, clip: int, copy: int) -> int:
    """The augmentation seed of copy ``copy`` (1..) of clip ``clip`` (its index in the manifest): a hash,
    so no two (seed, clip, copy) share one and no other stage's seeding coincides with it."""
    digest = hashlib.sha1(f"ctc-head-augment/{seed}/{clip}/{copy}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def encode_manifest(manifest: str | Path, whisper_dir: str | Path, cache_dir: str | Path,
                    batch_size: int = 8, *, copy: int = 0, seed: int = 0,
                    augment_cfg: AugmentConfig | None = None) -> Features:
    """The frozen Whisper states of every clip, computed once and cached (keyed by manifest and encoder).

    ``copy`` 0: the clips as recorded. ``copy`` k >= 1: each clip augmented by ``augment_cfg`` (default:
    ``AugmentConfig(prob=1.0)``) with the seed :func:`augment_seed` (``seed``, its index, k), cached in a
    file of its own keyed also by k, ``seed`` and the augmentation settings. A clip longer than Whisper's
    window, as recorded or slowed down, gets 0 frames (:func:`ctc_targets` skips it, counted).
    """
    manifest, cache_dir = Path(manifest), Path(cache_dir)
    if copy < 0:
        raise ValueError(f"copy must be 0 (clean) or a positive copy index, got {copy}")
    fields = {"manifest": _file_key(manifest), "whisper": whisper_key(whisper_dir)}
    name = f"{manifest.stem}-{hashlib.sha1(str(manifest.resolve()).encode()).hexdigest()[:10]}"
    if copy:
        augmentation = {"copy": copy, "seed": seed, "settings": augment_settings(augment_cfg)}
        fields["augment"] = augmentation
        name += f"-aug{copy}-" + hashlib.sha1(json.dumps(augmentation, sort_keys=True).encode()).hexdigest()[:8]
    key = json.dumps(fields, sort_keys=True)
    path = cache_dir / f"{name}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            if meta.get("key") == key:
                return Features(json.loads(meta["ids"]), f.get_tensor("feats"), f.get_tensor("lengths"))
        log.info("%s: manifest or encoder changed since it was cached, re-encoding", path)

    items = load_manifest(manifest, require_audio=True)
    encoder = WhisperSpeechEncoder.from_pretrained(whisper_dir)
    if copy and augment_cfg is None:
        augment_cfg = AugmentConfig(prob=1.0)
    max_samples = encoder.max_mel_frames * encoder.feature_extractor.hop_length
    start = time.perf_counter()
    # Batches of similar length waste little on padding; the output does not depend on the batching.
    order = sorted(range(len(items)), key=lambda i: items[i].duration or 0.0)
    states: list[torch.Tensor | None] = [None] * len(items)
    too_long = 0
    desc = f"encoding {manifest.name}" + (f" (augmented copy {copy})" if copy else "")
    for first in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        chunk, waves = [], []
        for i in order[first : first + batch_size]:
            wave = load_audio(items[i].audio, SAMPLE_RATE)
            if copy:
                wave = augment_seeded(wave, SAMPLE_RATE, augment_cfg, augment_seed(seed, i, copy))
            if wave.shape[0] > max_samples:  # recorded, or slowed down, past 30 s
                states[i], too_long = torch.zeros(0, encoder.output_dim, dtype=torch.float16), too_long + 1
                continue
            chunk.append(i)
            waves.append(wave)
        if not chunk:
            continue
        feats, lengths = encoder.encode_speech(waves)
        for row, i in enumerate(chunk):
            states[i] = feats[row, : lengths[row]].half()
    if too_long:
        log.warning("%s, copy %d: %d clips longer than Whisper's window, not encoded", manifest, copy, too_long)
    log.info("encoded %d clips of %s%s in %.0f s", len(items), manifest, f" (copy {copy})" if copy else "",
             time.perf_counter() - start)
    features = Features([u.id for u in items], torch.cat(states), torch.tensor([s.shape[0] for s in states]))

    # A rebuildable cache: no fsync.
    data = safetensors_bytes({"feats": features.feats, "lengths": features.lengths},
                             metadata={"key": key, "ids": json.dumps(features.ids)})
    atomic_write(path, data, fsync=False)
    return features


# ---------------------------------------------------------------------------------------------------
# Training and scoring
# ---------------------------------------------------------------------------------------------------


def ctc_targets(vocab: CTCVocabulary, utterances: list[Utterance], lengths: torch.Tensor
                ) -> tuple[list[int], list[list[int]], Counter[str]]:
    """The clips to train on, their unit ids, and how many were skipped and why."""
    keep, targets, skipped = [], [], Counter()
    for i, (utt, n_frames) in enumerate(zip(utterances, lengths.tolist())):
        ids = vocab.encode(utt.text)
        repeats = sum(a == b for a, b in zip(ids, ids[1:]))  # CTC needs a blank between repeated units
        if n_frames == 0:
            skipped["too_long"] += 1  # past Whisper's window, as recorded or augmented (encode_manifest)
        elif _DIGIT.search(utt.text):
            skipped["digits"] += 1  # spoken as words the units cannot spell: a wrong target
        elif not ids:
            skipped["empty_target"] += 1
        elif n_frames < len(ids) + repeats:
            skipped["too_short"] += 1
        else:
            keep.append(i)
            targets.append(ids)
    return keep, targets, skipped


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator,
                 frames_per_mask: int = 50, max_frames: int = 8, feature_masks: int = 2,
                 max_feature_fraction: float = 0.1) -> torch.Tensor:
    """SpecAugment on frozen states: zero ~1 random span of <= 8 frames per second and 2 bands of <= 10 % of dims.

    The only augmentation left once the features are cached; it makes the BiLSTM use context rather
    than memorise the training voices.
    """
    feats = feats.clone()
    dim = feats.shape[-1]
    max_features = int(dim * max_feature_fraction)

    def randint(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    for row, n in enumerate(lengths.tolist()):
        for _ in range(n // frames_per_mask):
            width = randint(max_frames + 1)
            start = randint(max(n - width, 1))
            feats[row, start : start + width] = 0.0
        for _ in range(feature_masks):
            width = randint(max_features + 1)
            start = randint(dim - width + 1)
            feats[row, :, start : start + width] = 0.0
    return feats


def length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length clips: padding would cost the (B, T, V) output layer and loss."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * 50
    batches = []
    for first in range(0, len(order), pool):
        chunk = sorted(order[first : first + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def ctc_loss(head: CTCHead, feats: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    log_probs = head(feats, lengths).log_softmax(-1).transpose(0, 1)  # (T, B, V) for CTCLoss
    flat = torch.tensor([u for t in targets for u in t], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    return torch.nn.functional.ctc_loss(log_probs, flat, lengths, target_lengths, blank=head.meta["blank_id"],
                                        zero_infinity=True)


@torch.no_grad()
def transcribe(head: CTCHead, vocab: CTCVocabulary, features: Features, batch_size: int = 32) -> list[str]:
    """Greedy CTC transcripts of every clip."""
    head.eval()
    hyps = []
    for first in range(0, len(features), batch_size):
        feats, lengths = features.batch(list(range(first, min(first + batch_size, len(features)))))
        best = head(feats, lengths).argmax(-1)
        hyps += [vocab.greedy_decode(best[i, : lengths[i]].tolist()) for i in range(len(lengths))]
    return hyps


def score(refs: list[str], hyps: list[str]) -> dict:
    """Corpus WER (Whisper normaliser) and CER (character edits / reference characters, same normaliser)."""
    errors, _ = corpus_errors(refs, hyps, normalizer="whisper")
    pairs = [(normalize(r, "whisper"), normalize(h, "whisper")) for r, h in zip(refs, hyps)]
    pairs = [(r, h) for r, h in pairs if r]  # jiwer refuses empty references
    cer = jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]) if pairs else 0.0
    return {"cer": round(float(cer), 4), **{k: round(v, 4) if isinstance(v, float) else v
                                            for k, v in errors.as_dict().items()}}


def train_head(head: CTCHead, vocab: CTCVocabulary, train: Features | FeatureSet, targets: list[list[int]],
               evaluate: Features, eval_refs: list[str], *, epochs: int, batch_size: int, lr: float,
               seed: int, augment: bool) -> list[dict]:
    """AdamW with warm-up + cosine decay and gradient clipping; greedy eval CER/WER after every epoch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = train.lengths.tolist()
    steps = epochs * math.ceil(len(lengths) / batch_size)
    warmup = max(1, steps // 20)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    history = []
    for epoch in range(1, epochs + 1):
        head.train()
        total, bar = 0.0, tqdm(length_bucketed_batches(lengths, batch_size, generator), desc=f"epoch {epoch}/{epochs}")
        for step, batch in enumerate(bar, start=1):
            feats, feat_lengths = train.batch(batch)
            if augment:
                feats = spec_augment(feats, feat_lengths, generator)
            loss = ctc_loss(head, feats, feat_lengths, [targets[i] for i in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / step:.3f}")
        metrics = score(eval_refs, transcribe(head, vocab, evaluate))
        history.append({"epoch": epoch, "loss": round(total / len(bar), 4), "eval_cer": metrics["cer"],
                        "eval_wer": metrics["wer"]})
        log.info("epoch %d: loss %.3f, eval CER %.3f, WER %.3f", epoch, total / len(bar), metrics["cer"], metrics["wer"])
    return history


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


def _saved_report(out_dir: Path, settings: dict) -> dict | None:
    if not all((out_dir / name).is_file() for name in HEAD_FILES):
        return None
    report = json.loads((out_dir / "report.json").read_text())
    return report if report.get("settings") == settings else None


def prepare_ctc_head(
    train_manifest: str | Path,
    eval_manifest: str | Path,
    out_dir: str | Path,
    *,
    whisper_dir: str | Path,
    units: str = "llm",
    kind: str = "bilstm",
    hidden: int = 256,
    epochs: int = 8,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    augment: bool = True,
    llm_dir: str | Path | None = None,
    max_units: int | None = None,
    text_manifest: str | Path | None = None,
    cache_dir: str | Path | None = None,
    augment_copies: int = 0,
    extra_train: Sequence[str | Path] = (),
) -> dict:
    """Train (or reuse) a CTC head on frozen Whisper states; return its report (``reused`` says which).

    ``text_manifest``: the text corpus whose token frequencies pick ``llm``/``hybrid`` units (default:
    the training transcripts). ``llm_dir`` defaults to the embedded SmolLM2 for those units.
    ``augment_copies``: waveform-augmented copies of every training clip trained on besides the clean
    one; ``extra_train``: more speech manifests trained on like ``train_manifest``. Both enter the
    settings only when used, so a head trained without them is still reused.
    """
    if augment_copies < 0:
        raise ValueError(f"augment_copies must be >= 0, got {augment_copies}")
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir.parent / "ctc-features"
    if units != "chars" and llm_dir is None:
        from speechllm.assets import smollm2_135m_instruct

        llm_dir = smollm2_135m_instruct()
    text_source = Path(text_manifest) if text_manifest is not None else Path(train_manifest)
    settings = {
        "units": units, "max_units": None if units == "chars" else (max_units or DEFAULT_MAX_UNITS[units]),
        "kind": kind, "hidden": hidden, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "augment": augment, "whisper": whisper_key(whisper_dir), "train": _file_key(Path(train_manifest)),
        "eval": _file_key(Path(eval_manifest)), "text": _file_key(text_source),
        "llm": None if units == "chars" else str(Path(llm_dir).resolve()),
    }
    if augment_copies:
        settings["augment_copies"] = augment_copies
        settings["augment_settings"] = augment_settings()
    if extra_train:
        settings["extra_train"] = [_file_key(Path(m)) for m in extra_train]
    report = _saved_report(out_dir, settings)
    if report is not None:
        log.info("%s already holds a CTC head for these settings: not retraining", out_dir)
        return {**report, "reused": True}

    start = time.perf_counter()
    sources = [Path(train_manifest), *map(Path, extra_train)]
    source_items = [load_manifest(m, require_audio=True) for m in sources]
    eval_items = load_manifest(eval_manifest, require_audio=True)
    # (source, copy) -> states; copy 0 is the clean clips.
    source_feats = [[encode_manifest(m, whisper_dir, cache_dir, copy=copy, seed=seed)
                     for copy in range(augment_copies + 1)] for m in sources]
    eval_feats = encode_manifest(eval_manifest, whisper_dir, cache_dir)
    encode_seconds = time.perf_counter() - start

    texts = [u.text for u in load_manifest(text_source, require_audio=False)]
    unit_list, token_ids = build_units(units, texts, llm_dir, settings["max_units"])
    vocab = CTCVocabulary(unit_list, blank_id=0)
    parts, targets, skipped, source_report = [], [], Counter(), []
    for manifest, items, copies in zip(sources, source_items, source_feats):
        kept, source_skipped = 0, Counter()
        for feats in copies:
            keep, copy_targets, copy_skipped = ctc_targets(vocab, items, feats.lengths)
            parts.append(feats.subset(keep))
            targets += copy_targets
            kept += len(keep)
            source_skipped += copy_skipped
        skipped += source_skipped
        source_report.append({"manifest": str(manifest), "clips": len(items), "copies": len(copies),
                              "train_clips": kept, "skipped": dict(source_skipped)})
        log.info("%s: %d clips x %d copies, %d to train on (skipped: %s)", manifest, len(items), len(copies),
                 kept, dict(source_skipped) or "none")
    if not targets:
        raise ValueError(f"{train_manifest}: no clip has a usable CTC target (skipped: {dict(skipped)})")
    log.info("%d units (%s); training on %d clips (skipped: %s)", len(vocab), units, len(targets),
             dict(skipped) or "none")
    train_set = parts[0] if len(parts) == 1 else FeatureSet(parts)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = CTCHead(eval_feats.feats.shape[-1], unit_list, blank_id=0, kind=kind, hidden=hidden)
    eval_refs = [u.text for u in eval_items]
    start = time.perf_counter()
    history = train_head(head, vocab, train_set, targets, eval_feats, eval_refs, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, augment=augment)
    train_seconds = time.perf_counter() - start
    hyps = transcribe(head, vocab, eval_feats)

    report = {
        "units": units, "vocab_size": len(vocab), "kind": kind, "hidden": hidden, "epochs": epochs,
        "train_clips": len(targets), "skipped": dict(skipped), "augment_copies": augment_copies,
        "train_sources": source_report, "encode_seconds": round(encode_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "eval": {"manifest": str(eval_manifest), "clips": len(eval_items), **score(eval_refs, hyps)},
        "examples": [{"id": u.id, "ref": u.text, "hyp": h} for u, h in list(zip(eval_items, hyps))[:5]],
        "history": history, "llm_token_ids": None if units == "chars" else token_ids, "settings": settings,
    }
    with atomic_folder(out_dir) as tmp:  # a killed run never leaves a head without its report
        head.save(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
    log.info("saved %s: eval CER %.3f, WER %.3f", out_dir, report["eval"]["cer"], report["eval"]["wer"])
    return {**report, "reused": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m stages prepare ctc-head``."""
    parser.add_argument("--train", required=True, type=Path, help="speech manifest to train on")
    parser.add_argument("--eval", required=True, type=Path, help="speech manifest to score on (held-out voices)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the head and its report.json")
    parser.add_argument("--whisper", type=Path, help="Whisper checkpoint folder (default: the embedded tiny.en)")
    parser.add_argument("--units", choices=UNIT_KINDS, default="llm",
                        help="chars, or LLM tokens plus chars: llm (~1500) or hybrid (a few hundred) (default: %(default)s)")
    parser.add_argument("--text", type=Path, help="text corpus that picks llm/hybrid units (default: --train)")
    parser.add_argument("--llm", type=Path, help="LLM folder whose tokenizer gives the units (default: SmolLM2)")
    parser.add_argument("--max-units", type=int, help=f"subword units (default: {DEFAULT_MAX_UNITS})")
    parser.add_argument("--kind", choices=["bilstm", "linear"], default="bilstm", help="head (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=256, help="BiLSTM hidden size (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="no SpecAugment")
    parser.add_argument("--augment-copies", type=int, default=0,
                        help="waveform-augmented copies of every training clip, encoded and cached once, trained on "
                             "besides the clean one (default: %(default)s)")
    parser.add_argument("--extra-train", action="append", type=Path, default=[], metavar="MANIFEST",
                        help="more training speech (e.g. prepare real-speech's train.jsonl), clean and augmented "
                             "like --train; repeatable")
    parser.add_argument("--cache-dir", type=Path, help="frozen-feature cache (default: <out>/../ctc-features)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.whisper is None:
        from speechllm.assets import whisper_tiny_en

        args.whisper = whisper_tiny_en()
    report = prepare_ctc_head(
        args.train, args.eval, args.out, whisper_dir=args.whisper, units=args.units, kind=args.kind,
        hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        augment=args.augment, llm_dir=args.llm, max_units=args.max_units, text_manifest=args.text,
        cache_dir=args.cache_dir, augment_copies=args.augment_copies, extra_train=args.extra_train,
    )
    print(json.dumps({k: report[k] for k in ("units", "vocab_size", "train_clips", "skipped", "train_sources",
                                            "train_seconds", "eval", "reused") if k in report}, indent=1))
    return 0
