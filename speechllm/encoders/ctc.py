"""CTC-posterior encoder: TASU's interface between speech and text.

Speech side: softmax posteriors of a frozen CTC model, compressed by LSD. Text side: CPS, i.e.
simulated posteriors over the same CTC vocabulary. Both live in one space (distributions over the
CTC units), so this is also TASU's *unified* encoder.

The CTC model is either any transformers ``AutoModelForCTC`` (wav2vec2, HuBERT, Parakeet, ...) or
a speech encoder plus a separately trained :class:`CTCHead` (e.g. a head on frozen Whisper states).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from speechllm.config import CPSConfig, EncoderConfig, plain
from speechllm.cps import simulate_ctc_posteriors
from speechllm.encoders.base import SpeechEncoder, UnifiedEncoder, pad_sequences
from speechllm.joint_decoding import ctc_log_likelihood
from speechllm.lsd import label_synchronous_compress
from speechllm.posterior_stats import PosteriorStats, simulate_matched_posteriors
from speechllm.simulator import PosteriorSimulator

_SPECIAL_TOKEN = re.compile(r"<[^<>]*>|\[[^\[\]]*\]")  # <pad>, <unk>, [UNK]: spell nothing
_STRAY_APOSTROPHE = re.compile(r"(?<![^\W\d_])'|'(?![^\W\d_])")  # quotes, not the one in "it's"


class CTCVocabulary:
    """The CTC units, their strings, and text -> unit ids.

    Text is first normalised to what the units can spell (:meth:`normalize`), the same on the text
    side (CPS) as for the targets a CTC head was trained on. With a transformers tokenizer the
    tokenizer's own encoding is used; otherwise text is split by greedy longest match over the unit
    strings (exact for character units, sensible for any subword inventory that contains every
    character as a fallback).
    """

    def __init__(self, units: list[str], blank_id: int, tokenizer=None):
        self.units = list(units)
        self.blank_id = blank_id
        self.tokenizer = tokenizer
        self._index: dict[str, int] = {}  # spelled text -> unit (so "|" and "\u2581x" match spaces)
        for i, unit in enumerate(self.units):
            if i != blank_id and unit and not _SPECIAL_TOKEN.fullmatch(unit):
                self._index.setdefault(self.unit_string(i), i)
        self._max_len = max((len(u) for u in self._index), default=1)
        # Character vocabularies are often single-case (wav2vec2: upper; ours: lower).
        letters = [u for u in self._index if u.isalpha()]
        self.case = "upper" if letters and all(u.isupper() for u in letters) else (
            "lower" if letters and all(u.islower() for u in letters) else None)
        self.alphabet = {c for spelled in self._index for c in spelled} | {" "}

    def __len__(self) -> int:
        return len(self.units)

    @classmethod
    def from_tokenizer(cls, tokenizer, blank_id: int, size: int) -> CTCVocabulary:
        units = [""] * size
        for token, idx in tokenizer.get_vocab().items():
            if idx < size:
                units[idx] = token
        return cls(units, blank_id, tokenizer)

    def normalize(self, text: str) -> str:
        """The text the units spell: the vocabulary's case, any character it lacks (punctuation,
        hyphens, digits) turned into a word break, quote marks dropped, single spaces."""
        text = text.replace("\u2019", "'")
        if self.case == "upper":
            text = text.upper()
        elif self.case == "lower":
            text = text.lower()
        text = "".join(c if c in self.alphabet else " " for c in text)
        return " ".join(_STRAY_APOSTROPHE.sub(" ", text).split())

    def encode(self, text: str) -> list[int]:
        text = self.normalize(text)
        if self.tokenizer is not None:
            return [i for i in self.tokenizer(text, add_special_tokens=False).input_ids if i != self.blank_id]
        ids, pos = [], 0
        while pos < len(text):
            for size in range(min(self._max_len, len(text) - pos), 0, -1):
                unit = self._index.get(text[pos : pos + size])
                if unit is not None:
                    ids.append(unit)
                    pos += size
                    break
            else:  # a character the vocabulary cannot spell: skip it
                pos += 1
        return ids

    def unit_string(self, idx: int) -> str:
        """The text a unit stands for (word delimiters of wav2vec2 / SentencePiece become spaces)."""
        return self.units[idx].replace("|", " ").replace("\u2581", " ")

    def greedy_decode(self, best_ids: list[int]) -> str:
        """Collapse repeats, drop blanks, join the unit strings."""
        out, prev = [], None
        for i in best_ids:
            if i != prev and i != self.blank_id:
                out.append(self.unit_string(i))
            prev = i
        return " ".join("".join(out).split())


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each (B, T, D) sequence's first ``lengths[b]`` frames; padding stays at the end."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :].expand(x.shape[0], -1)
    source = lengths.to(x.device)[:, None] - 1 - steps
    source = torch.where(source >= 0, source, steps)
    return x.gather(1, source[..., None].expand_as(x))


class CTCHead(nn.Module):
    """A CTC head over frozen encoder states: ``linear`` or a 1-layer ``bilstm`` + linear.

    The BiLSTM runs as two unidirectional LSTMs on padded batches, the backward one on each sequence
    reversed within its length, so padding only ever follows the valid frames: exactly a packed
    bidirectional LSTM (a clip's output does not depend on its batch mates), without the packed
    backward pass, which on CPU costs ~15x more.
    """

    def __init__(self, input_dim: int, vocab: list[str], blank_id: int = 0, kind: str = "linear", hidden: int = 256):
        super().__init__()
        self.meta = {"input_dim": input_dim, "vocab": list(vocab), "blank_id": blank_id, "kind": kind, "hidden": hidden}
        if kind == "bilstm":
            self.rnn_forward = nn.LSTM(input_dim, hidden, batch_first=True)
            self.rnn_backward = nn.LSTM(input_dim, hidden, batch_first=True)
            self.out = nn.Linear(2 * hidden, len(vocab))
        elif kind == "linear":
            self.rnn_forward = self.rnn_backward = None
            self.out = nn.Linear(input_dim, len(vocab))
        else:
            raise ValueError(f"unknown CTC head kind {kind!r} (linear | bilstm)")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.rnn_forward is not None:
            ahead = self.rnn_forward(feats)[0]
            behind = reverse_within_lengths(self.rnn_backward(reverse_within_lengths(feats, lengths))[0], lengths)
            feats = torch.cat([ahead, behind], dim=-1)
        return self.out(feats)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "head.safetensors"))
        (directory / "head.json").write_text(json.dumps(self.meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> CTCHead:
        directory = Path(directory)
        if not (directory / "head.json").is_file():
            raise FileNotFoundError(f"no CTC head at {directory} (expected head.json + head.safetensors)")
        head = cls(**json.loads((directory / "head.json").read_text()))
        state = load_file(str(directory / "head.safetensors"))
        # Heads saved from one bidirectional nn.LSTM ("rnn.*", "*_reverse") hold the same weights.
        state = {(k.replace("rnn.", "rnn_backward.").removesuffix("_reverse") if k.endswith("_reverse")
                  else k.replace("rnn.", "rnn_forward.")): v for k, v in state.items()}
        head.load_state_dict(state)
        return head


class CTCPosteriorEncoder(UnifiedEncoder):
    """Frozen CTC model -> posteriors -> LSD; text -> CPS. ``output_dim`` = CTC vocabulary size."""

    def __init__(self, vocab: CTCVocabulary, cfg: EncoderConfig, *, hf_model=None, feature_extractor=None,
                 backbone: SpeechEncoder | None = None, head: CTCHead | None = None):
        super().__init__()
        if (hf_model is None) == (backbone is None):
            raise ValueError("give either a transformers CTC model or a backbone + CTC head")
        self.vocab = vocab
        self.blank_id = vocab.blank_id
        self.output_dim = len(vocab)
        self.sample_rate = cfg.sample_rate
        self.use_lsd = cfg.lsd
        self.blank_threshold = cfg.lsd_blank_threshold
        self.cps: CPSConfig = cfg.cps
        self.text_side = str(cfg.text_side)
        self.stats = PosteriorStats.load(cfg.cps.stats) if self.text_side == "matched" else None
        self.simulator = PosteriorSimulator.load(cfg.cps.simulator) if self.text_side == "learned" else None
        self.hf_model, self.feature_extractor = hf_model, feature_extractor
        self.backbone, self.head = backbone, head
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def posteriors(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame-level CTC posteriors (B, T, V) and their lengths."""
        if self.backbone is not None:
            feats, lengths = self.backbone.encode_speech(waveforms)
            return self.head(feats, lengths).float().softmax(-1), lengths
        # One clip at a time: exact for every CTC model, whatever its normalisation of padding
        # (group-norm wav2vec2 variants change their output when a batch is padded).
        device = next(self.hf_model.parameters()).device
        probs = []
        for wav in waveforms:
            inputs = self.feature_extractor(wav.float().cpu().numpy(), sampling_rate=self.sample_rate, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in inputs.items() if k != "attention_mask"}
            probs.append(self.hf_model(**inputs).logits[0].float().softmax(-1))
        return pad_sequences(probs)

    @torch.no_grad()
    def encode_speech(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compress(*self.posteriors(waveforms))

    @torch.no_grad()
    def compress(self, probs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame posteriors -> what the projector reads: LSD vectors (or the frames, without LSD)."""
        if not self.use_lsd:
            return probs, lengths
        lengths = lengths.to(probs.device)
        feats, out_lengths = label_synchronous_compress(probs, lengths, self.blank_id, self.blank_threshold)
        empty = (out_lengths == 0).nonzero().flatten().tolist()
        if empty:
            # Silence (every frame blank) would leave the LLM no speech at all, and a batch of it no
            # gradient: such a clip keeps its least-blank frame.
            if feats.shape[1] == 0:
                feats = probs.new_zeros(probs.shape[0], 1, probs.shape[-1])
            for i in empty:
                blank = probs[i, : max(int(lengths[i]), 1), self.blank_id].nan_to_num(nan=2.0)
                feats[i, 0] = probs[i, int(blank.argmin())]
                out_lengths[i] = 1
        return feats, out_lengths

    @torch.no_grad()
    def encode_text(self, texts: list[str], generators: list[torch.Generator] | None = None,
                    cps: CPSConfig | None = None):
        generators = generators or [None] * len(texts)
        cps = cps or self.cps
        rows = []
        for text, g in zip(texts, generators):
            ids = torch.tensor(self.vocab.encode(text), dtype=torch.long)
            side = self.text_side if self.text_side != "cps" and torch.rand((), generator=g) < cps.side_share else "cps"
            rows.append(TEXT_SIDES[side](self, ids, cps, g))
        rows = [r if r.shape[0] else torch.zeros(1, self.output_dim) for r in rows]  # never empty
        return pad_sequences(rows)

    @torch.no_grad()
    def greedy_transcribe(self, waveforms: list[torch.Tensor]) -> list[str]:
        """Greedy CTC decoding of the encoder alone (the baseline the LLM has to beat)."""
        return self.greedy_from_posteriors(*self.posteriors(waveforms))

    def greedy_from_posteriors(self, probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        best = probs.argmax(-1)
        return [self.vocab.greedy_decode(best[i, : lengths[i]].tolist()) for i in range(len(probs))]

    def ctc_log_likelihoods(self, probs: torch.Tensor, length: int, texts: list[str]) -> list[float]:
        """log p_CTC(text | one clip's frames) of each text, in the encoder's units."""
        log_probs = probs[:length].float().clamp_min(1e-12).log()
        return [ctc_log_likelihood(log_probs, self.vocab.encode(t), self.blank_id) for t in texts]


def _learned(encoder: CTCPosteriorEncoder, ids: torch.Tensor, cps: CPSConfig, g) -> torch.Tensor:
    wer = cps.wer_min + (cps.wer_max - cps.wer_min) * float(torch.rand((), generator=g))
    return encoder.simulator.simulate(ids, encoder.simulator.condition_for(wer), g)


# ``encoder.text_side`` -> (encoder, one utterance's unit ids, rates, generator) -> its posteriors (L', V).
TEXT_SIDES = {
    "cps": lambda encoder, ids, cps, g: simulate_ctc_posteriors(ids, encoder.output_dim, encoder.blank_id, cps, g),
    "matched": lambda encoder, ids, cps, g: simulate_matched_posteriors(ids, encoder.stats, encoder.output_dim, g),
    "learned": _learned,
}


def _default_feature_extractor(model_type: str, sample_rate: int):
    """The model family's feature extractor with its default settings (needs no download)."""
    import transformers
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

    name = FEATURE_EXTRACTOR_MAPPING_NAMES.get(model_type) or FEATURE_EXTRACTOR_MAPPING_NAMES.get(model_type.removesuffix("_ctc"))
    if name is None:
        raise ValueError(f"no default feature extractor known for encoder model_type {model_type!r}")
    return getattr(transformers, name)(sampling_rate=sample_rate)


def build_ctc_encoder(cfg: EncoderConfig) -> CTCPosteriorEncoder:
    """From a Hub/local ``AutoModelForCTC``, a random ``from_config`` one, or a backbone + head."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer

    if cfg.ctc_head:
        if cfg.backbone != "whisper":
            raise ValueError(f"encoder.ctc_head needs encoder.backbone: whisper (got {cfg.backbone!r})")
        from speechllm.encoders.whisper import WhisperSpeechEncoder

        head = CTCHead.load(cfg.ctc_head)
        backbone = WhisperSpeechEncoder.from_pretrained(cfg.pretrained)
        vocab = CTCVocabulary(head.meta["vocab"], head.meta["blank_id"])
        return CTCPosteriorEncoder(vocab, cfg, backbone=backbone, head=head)

    if cfg.from_config is not None:
        if not cfg.vocab:
            raise ValueError("encoder.from_config needs encoder.vocab (the CTC units, index 0 = blank)")
        kwargs = plain(cfg.from_config)
        model_type = kwargs.pop("model_type", "wav2vec2")
        blank = cfg.blank_id if cfg.blank_id is not None else 0
        config = AutoConfig.for_model(model_type, vocab_size=len(cfg.vocab), pad_token_id=blank, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCTC.from_config(config)
        extractor = _default_feature_extractor(model_type, cfg.sample_rate)
        vocab = CTCVocabulary(plain(cfg.vocab), blank)
    else:
        if not cfg.pretrained:
            raise ValueError("encoder: set `pretrained` (Hub id or path) or `from_config`")
        model = AutoModelForCTC.from_pretrained(cfg.pretrained)
        extractor = AutoFeatureExtractor.from_pretrained(cfg.pretrained)
        tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
        blank = cfg.blank_id if cfg.blank_id is not None else model.config.pad_token_id
        if blank is None:
            raise ValueError(f"{cfg.pretrained}: no pad_token_id in its config; set encoder.blank_id")
        vocab = CTCVocabulary.from_tokenizer(tokenizer, blank, model.config.vocab_size)
    return CTCPosteriorEncoder(vocab, cfg, hf_model=model, feature_extractor=extractor)
