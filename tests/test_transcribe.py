"""A model people can use: ``transcribe`` (API and CLI) on files at any rate and channel count, the
``export`` command (self-contained, LoRA merged or not) and the model card, on the tiny model.

A random tiny LLM's near-flat logits pick the same newline at every step, so generation would compare
empty strings; as in tests/test_model.py its matrices are scaled up ("sharpened"). Here the LLM is
fully trainable (``llm.freeze: false``), so the sharpened weights are saved with the export and come
back with ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from speechllm.audio import AudioError, prepare_waveforms
from speechllm.config import ModelConfig, StageConfig
from speechllm.model import SpeechLLM
from speechllm.model_card import render_model_card
from speechllm.tts import resample
from stages import __main__ as cli
from stages.export import export_model
from stages.transcribe import output_line

RATE = 16000


def tiny_cfg(repo, **llm):
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(repo / "configs/model/tiny.yaml").model)
    for key, value in llm.items():
        OmegaConf.update(cfg, f"llm.{key}", value)
    return cfg


def sharpen(model: SpeechLLM) -> SpeechLLM:
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


def noise(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """(samples,) or (samples, channels) float32, different in every channel."""
    g = np.random.default_rng(seed)
    x = (0.1 * g.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    return x[:, 0] if channels == 1 else x


@pytest.fixture(scope="module")
def sharp(repo):
    """The in-memory sharpened model (built here, never saved or loaded)."""
    torch.manual_seed(0)
    return sharpen(SpeechLLM.build(tiny_cfg(repo, freeze=False))).eval()


@pytest.fixture(scope="module")
def exported(sharp, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp") / "model"
    sharp.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(exported):
    return SpeechLLM.from_pretrained(exported)


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    """A 16 kHz mono wav, a 44.1 kHz stereo wav (channels differ), a 22.05 kHz mono array, a text file named .wav."""
    d = tmp_path_factory.mktemp("audio")
    mono, stereo = noise(1.0, RATE, 1), noise(0.8, 44100, 2, channels=2)
    sf.write(d / "mono16k.wav", mono, RATE, subtype="FLOAT")
    sf.write(d / "stereo44k.wav", stereo, 44100, subtype="FLOAT")
    (d / "notaudio.wav").write_text("this is a text file, not audio\n")
    return {"mono": d / "mono16k.wav", "mono_data": mono, "stereo": d / "stereo44k.wav", "stereo_data": stereo,
            "array22k": noise(0.9, 22050, 3), "text": d / "notaudio.wav", "missing": d / "missing.wav"}


def test_save_load_transcribe_a_16k_wav_and_arrays(sharp, loaded, wavs):
    from_file = loaded.transcribe([str(wavs["mono"])])
    assert from_file[0], "the sharpened tiny model must generate text"
    # the reloaded model is the saved one; a path, a numpy array and a tensor at 16 kHz agree
    assert from_file == sharp.transcribe([torch.from_numpy(wavs["mono_data"])])
    assert loaded.transcribe(wavs["mono_data"], sample_rate=RATE) == from_file
    assert loaded.transcribe([wavs["mono"], torch.from_numpy(wavs["mono_data"])]) == from_file * 2
    # the transcript depends on the audio (so the equalities below can fail)
    assert loaded.transcribe(noise(1.0, RATE, 9)) != from_file


def test_a_44k_stereo_wav_equals_the_same_audio_mixed_and_resampled_by_hand(loaded, wavs):
    by_hand = resample(torch.from_numpy(wavs["stereo_data"]).mean(dim=1), 44100, RATE)
    assert by_hand.shape == (math.ceil(0.8 * 44100 * RATE / 44100),)
    torch.testing.assert_close(prepare_waveforms([wavs["stereo"]], RATE)[0], by_hand, rtol=0, atol=0)
    hyp = loaded.transcribe([wavs["stereo"]])
    assert hyp[0] and hyp == loaded.transcribe([by_hand])
    # one channel alone, or the audio not resampled, is another input with another transcript
    assert hyp != loaded.transcribe([torch.from_numpy(wavs["stereo_data"][:, 0])], sample_rate=44100)
    assert hyp != loaded.transcribe([torch.from_numpy(wavs["stereo_data"]).mean(dim=1)])


def test_mono_mixing_and_resampling_match_the_signal_at_the_target_rate():
    """A 440 Hz tone at 44.1 kHz, louder on the right, becomes the channels' mean tone at 16 kHz."""
    t44, t16 = np.arange(44100) / 44100, np.arange(RATE) / RATE
    tone = np.sin(2 * np.pi * 440 * t44)
    stereo = np.stack([0.2 * tone, 0.6 * tone]).astype(np.float32)  # (channels, samples)
    expected = torch.from_numpy((0.4 * np.sin(2 * np.pi * 440 * t16)).astype(np.float32))
    for layout in (stereo, stereo.T):  # torch's (channels, samples) and soundfile's (samples, channels)
        got = prepare_waveforms(layout, RATE, sample_rate=44100)[0]
        assert got.shape == expected.shape
        torch.testing.assert_close(got[200:-200], expected[200:-200], rtol=0, atol=5e-3)
    pcm = (stereo.T * 32767).astype(np.int16)  # integer PCM is scaled to [-1, 1)
    torch.testing.assert_close(prepare_waveforms(pcm, RATE, sample_rate=44100)[0][200:-200], expected[200:-200],
                               rtol=0, atol=5e-3)


def test_an_array_at_another_rate_uses_sample_rate(loaded, wavs):
    array = wavs["array22k"]
    hyp = loaded.transcribe([array], sample_rate=22050)
    assert hyp[0] and hyp == loaded.transcribe([resample(torch.from_numpy(array), 22050, RATE)])
    assert hyp != loaded.transcribe([array])  # the same samples read as 16 kHz: slower, another input


def test_batches_equal_one_by_one_and_the_mode_is_restored(repo, wavs):
    torch.manual_seed(0)
    model = sharpen(SpeechLLM.build(tiny_cfg(repo, freeze=False, **{"from_config.attention_dropout": 0.5})))
    clips = [wavs["mono"], wavs["stereo"], torch.from_numpy(noise(0.5, RATE, 4))]
    model.eval()
    single = [model.transcribe([c])[0] for c in clips]
    model.train()  # with dropout on, generation would be random: transcribe runs in eval mode
    assert model.transcribe(clips, batch_size=2) == single and all(single)
    assert model.training and model.llm.training


def test_a_missing_or_non_audio_file_is_an_error_naming_it(loaded, wavs):
    for path, words in ((wavs["missing"], "no such file"), (wavs["text"], "not an audio file")):
        with pytest.raises(AudioError, match=f"{path}: {words}"):
            loaded.transcribe([wavs["mono"], path])


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stages", "transcribe", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_one_line_per_file(loaded, exported, wavs, repo):
    files = [wavs["mono"], wavs["stereo"], wavs["mono"]]
    out = _cli("--model", exported, "--batch-size", "2", *files, cwd=repo)
    assert out.returncode == 0, out.stderr
    expected = [f"{f}\t{' '.join(h.split())}" for f, h in zip(files, loaded.transcribe(files))]
    assert output_line("a b.wav", " one\ttwo\n three ") == "a b.wav\tone two three"
    assert out.stdout.splitlines() == expected and all(line.split("\t")[1] for line in expected)
    beam = _cli("--model", exported, "--beam", "3", "--max-new-tokens", "4", wavs["mono"], cwd=repo)
    assert beam.returncode == 0 and len(beam.stdout.splitlines()[0].split("\t")[1]) < len(expected[0].split("\t")[1])


def test_cli_missing_and_non_audio_files_exit_2_naming_each_before_anything_is_transcribed(exported, wavs, repo, capsys):
    rc = cli.main(["transcribe", "--model", str(exported), str(wavs["mono"]), str(wavs["missing"]), str(wavs["text"])])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert f"error: {wavs['missing']}: no such file" in err
    assert f"error: {wavs['text']}: not an audio file soundfile can read" in err
    assert str(wavs["mono"]) not in err
    proc = _cli("--model", exported, wavs["text"], cwd=repo)  # the process's own exit code
    assert proc.returncode == 2 and str(wavs["text"]) in proc.stderr and proc.stdout == ""
    assert cli.main(["transcribe", "--model", str(wavs["mono"].parent), str(wavs["mono"])]) == 2
    assert "no model.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export, merged LoRA


@pytest.fixture(scope="module")
def lora_dir(repo, tmp_path_factory):
    """A tiny model with trained-looking (random, non-zero) LoRA adapters, saved."""
    cfg = tiny_cfg(repo, **{"lora.enabled": True, "lora.r": 4, "lora.alpha": 8,
                            "lora.target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]})
    model = SpeechLLM.build(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("lora") / "model"
    model.save_pretrained(out)
    return out


def _logits(model: SpeechLLM, waves: list[torch.Tensor], llm=None) -> torch.Tensor:
    with torch.no_grad():
        feats, lengths = model.encoder.encode_speech(waves)
        speech, speech_len = model.project(feats, lengths)
        rows, _ = model.instruction_rows(speech_len.tolist(), model.target_ids(["the cat sat", "hi"]))
        return (llm or model.llm)(**model.splice(rows, speech=model.flatten(speech, speech_len))).logits


def test_merged_lora_export_transcribes_as_the_unmerged_one(lora_dir, tmp_path, wavs, repo):
    plain, merged = export_model(lora_dir, tmp_path / "plain"), export_model(lora_dir, tmp_path / "merged", merge_lora=True)
    assert not (plain / "llm").exists() and (merged / "llm" / "model.safetensors").is_file()
    meta = json.loads((merged / "model.json").read_text())
    assert meta["local"] == {"llm.pretrained": "llm"} and meta["model"]["llm"]["lora"]["enabled"] is False
    assert meta["merged_lora"]["r"] == 4 and meta["merged_lora"]["alpha"] == 8
    a, b = SpeechLLM.from_pretrained(plain), SpeechLLM.from_pretrained(merged)
    assert hasattr(a.llm, "peft_config") and not hasattr(b.llm, "peft_config")
    assert not any("lora_" in n for n in b.trainable_state_dict())
    waves = [torch.from_numpy(wavs["mono_data"]), prepare_waveforms(wavs["stereo"], RATE)[0]]
    adapted = _logits(a, waves)
    torch.testing.assert_close(_logits(b, waves), adapted, rtol=1e-4, atol=1e-5)
    with a.original_llm() as base:  # the adapters matter: without them the logits differ
        assert not torch.allclose(_logits(a, waves, base), adapted, atol=1e-2)
    hyps = a.transcribe(waves)
    assert all(hyps) and b.transcribe(waves) == hyps
    # a merged model's own LLM is no longer the original: the teacher is rebuilt from the base it came from
    with pytest.raises(RuntimeError, match="merged"), b.original_llm():
        pass
    b.attach_frozen_teacher()
    with a.original_llm() as base_a, b.original_llm() as base_b:
        torch.testing.assert_close(_logits(b, waves, base_b), _logits(a, waves, base_a), rtol=1e-4, atol=1e-5)
    # the merged export loads and transcribes with peft unimportable
    code = ("import sys; sys.modules['peft'] = None\nfrom speechllm.model import SpeechLLM\n"
            f"m = SpeechLLM.from_pretrained({str(merged)!r})\nprint(m.transcribe({str(wavs['mono'])!r})[0])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == b.transcribe([wavs["mono"]])[0]


def test_export_is_not_an_automodel_but_its_merged_llm_is_a_causal_lm(lora_dir, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    merged = export_model(lora_dir, tmp_path / "merged", merge_lora=True)
    assert not (merged / "config.json").exists()
    with pytest.raises((OSError, ValueError), match="config.json"):  # documented: SpeechLLM.from_pretrained is the way in
        AutoModel.from_pretrained(str(merged), trust_remote_code=True)
    model = SpeechLLM.from_pretrained(merged)
    llm = AutoModelForCausalLM.from_pretrained(str(merged / "llm"))
    ids = torch.tensor([model.prompt.prefix_ids])
    torch.testing.assert_close(llm(input_ids=ids).logits, model.llm(input_ids=ids).logits)


def test_export_copies_local_parts_so_the_directory_can_move(repo, tmp_path, wavs):
    base = tmp_path / "base-llm"  # a tiny LLM as a local folder, as the demo's SmolLM2 is
    torch.manual_seed(0)
    built = sharpen(SpeechLLM.build(tiny_cfg(repo)))
    built.llm.save_pretrained(base)
    built.tokenizer.save_pretrained(base)
    model = SpeechLLM.build(tiny_cfg(repo, pretrained=str(base), from_config=None))
    model.save_pretrained(tmp_path / "stage" / "model")
    hyp = model.transcribe([wavs["mono"]])
    assert hyp[0] and json.loads((tmp_path / "stage/model/model.json").read_text())["model"]["llm"]["pretrained"] == str(base)
    out = export_model(tmp_path / "stage" / "model", tmp_path / "moved")
    meta = json.loads((out / "model.json").read_text())
    assert meta["local"] == {"llm.pretrained": "llm"} and meta["origins"] == {"llm.pretrained": str(base)}
    for f in base.iterdir():
        f.unlink()
    base.rmdir()
    assert SpeechLLM.from_pretrained(out).transcribe([wavs["mono"]]) == hyp
    assert cli.main(["export", "--model", str(tmp_path / "stage" / "model"), "--out", str(tmp_path / "x"),
                     "--merge-lora"]) == 2  # no LoRA to merge: a clear error, exit 2


# ----------------------------------------------------------------------------- the model card


def test_every_export_has_a_card_naming_its_parts_data_and_metrics(repo, tmp_path, lora_dir):
    from stages.stage_dir import StageDir

    card = (lora_dir / "README.md").read_text()
    assert "LoRA adapters trained (r 4, alpha 8, on q_proj, v_proj, o_proj, down_proj" in card
    assert "**not** loadable with transformers' `AutoModel" in card
    # in the runner's layout the card reads the stage's config.yaml and metrics.json
    stage = StageDir(tmp_path / "runs" / "p" / "asr")
    cfg = OmegaConf.merge(OmegaConf.structured(StageConfig), {
        "kind": "asr", "init_from": "runs/p/align/model", "trainer": {"max_steps": 100},
        "data": {"sources": {"speech": {"manifest": "data/x/speech/train.jsonl", "kind": "speech"},
                             "simulated": {"manifest": "data/x/text/train.jsonl", "kind": "simulated"}},
                 "test": {"heldout": "data/x/speech/test.jsonl"}}})
    stage.root.mkdir(parents=True)
    stage.write_config(cfg)
    stage.metrics.write_text(json.dumps({"test/heldout/wer": 0.573, "initial/test/heldout/wer": 0.9,
                                         "test/heldout/substitutions": 7, "val/docs/M": 0.42}))
    SpeechLLM.from_pretrained(lora_dir).save_pretrained(stage.model)
    card = (stage.model / "README.md").read_text()
    assert card.startswith("---\n") and "# asr:" in card
    for text in ("| speech | speech | `data/x/speech/train.jsonl` |", "| simulated | simulated | `data/x/text/train.jsonl` |",
                 "started from `runs/p/align/model`", "heldout (`data/x/speech/test.jsonl`)",
                 "| `test/heldout/wer` | 0.5730 |", "| `initial/test/heldout/wer` | 0.9000 |", "| `val/docs/M` | 0.4200 |"):
        assert text in card, text
    assert "substitutions" not in card


def test_card_licences_hub_ids_and_the_embedded_default(repo):
    hub = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(
        repo / "configs/model/tasu_paper.yaml").model), enum_to_str=True)
    card = render_model_card({"model": hub}, {"projector.fc1.weight": 10})
    encoder, llm = hub["encoder"]["pretrained"], hub["llm"]["pretrained"]
    assert f"base_model: [{encoder}, {llm}]" in card
    for part in (encoder, llm):
        assert f"Hub id `{part}`" in card and f"see the model's Hub page, https://huggingface.co/{part}" in card
    assert "| LLM | causal LM (bfloat16) |" in card and "| frozen |" in card
    demo = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(
        repo / "configs/model/demo.yaml").model), enum_to_str=True)
    card = render_model_card({"model": demo}, {"projector.fc1.weight": 10, "llm.base_model.x.lora_A": 5})
    lines = {line.split(" | ")[0]: line for line in card.splitlines() if line.startswith("| ")}
    assert "MIT" in lines["| encoder"] and "whisper-tiny.en" in lines["| encoder"]
    assert "ctc-head-whisper-tiny.en" in lines["| CTC head"] and "trained by this project" in lines["| CTC head"]
    assert "SmolLM2-135M-Instruct" in lines["| LLM"] and "Apache-2.0" in lines["| LLM"]
    assert "base_model" not in card  # local assets are not Hub ids
