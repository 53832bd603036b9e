"""``bench gpu``: the model-FLOPs formula against counts of real modules' parameters, the peak table,
the tiny CPU path end to end, the refusal without CUDA, and one pipeline stage run through the fallback."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages import bench_gpu

REPO = Path(__file__).resolve().parents[1]


def _decoder(cfg: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(cfg)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))


def _body_params(model) -> int:
    """Every parameter but the token embedding and the LM head, summed from the module's own tensors."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)


# Written apart from the bench's own configs: biases on (llama), an explicit head_dim, an untied head.
HAND_CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
              "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 10, "vocab_size": 97,
              "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 61, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("kind", list(HAND_CONFIGS))
def test_model_flops_per_token_is_the_hand_count(kind):
    from peft import LoraConfig, get_peft_model

    cfg = HAND_CONFIGS[kind]
    model = _decoder(cfg)
    n = _body_params(model)
    layers, seq = cfg["num_hidden_layers"], 10
    attn_width = model.model.layers[0].self_attn.q_proj.out_features
    assert bench_gpu.non_embedding_params(cfg) == n
    assert bench_gpu.model_flops_per_token(cfg, seq) == 2 * n + 2 * 2 * layers * seq * attn_width

    targets = ["q_proj", "v_proj", "down_proj"]
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    n_a = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    assert bench_gpu.lora_params(cfg, 4, targets) == n_a
    forward = 2 * (n + n_a) + 4 * layers * seq * attn_width
    input_gradients = 2 * (n + n_a) + 2 * 4 * layers * seq * attn_width
    adapter_gradients = 2 * n_a
    assert bench_gpu.model_flops_per_token(cfg, seq, backward=True, adapters=n_a, trained=n_a) == (
        forward + input_gradients + adapter_gradients)

    d, v = cfg["hidden_size"], cfg["vocab_size"]
    assert [bench_gpu.head_flops_per_position(cfg, backward=b, trains=t) for b, t in
            [(False, False), (True, False), (True, True)]] == [2 * d * v, 4 * d * v, 6 * d * v]


def test_encoder_flops_is_the_hand_count():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = {"d_model": 24, "encoder_layers": 2, "encoder_attention_heads": 3, "encoder_ffn_dim": 40,
           "num_mel_bins": 80, "max_source_positions": 100}
    encoder = WhisperEncoder(WhisperConfig(**cfg))
    conv1 = sum(p.numel() for p in encoder.conv1.parameters())
    per_output_frame = sum(p.numel() for name, p in encoder.named_parameters()
                           if not name.startswith(("conv1.", "embed_positions.")))
    mel, frames = 101, 51  # conv2 halves the frames, rounding up
    assert bench_gpu.encoder_flops(cfg, mel) == (2 * conv1 * mel + 2 * per_output_frame * frames
                                                 + 4 * cfg["encoder_layers"] * frames**2 * cfg["d_model"])


def test_peak_flops_by_device_name():
    peaks = {name: bench_gpu.peak_flops(name)[0] for name in
             ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L4",
              "NVIDIA L40S", "Some Future GPU"]}
    assert peaks == {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
                     "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12, "Some Future GPU": None}
    assert bench_gpu.peak_flops("Some Future GPU", peak_tflops=100)[0] == 100e12


def test_tiny_cpu_run_end_to_end(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "stages", "bench", "gpu", "--device", "cpu", "--tiny", "--no-pipeline",
                           "--only", "baseline", "--peak-tflops", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["device"] in proc.stdout and report["device"].startswith("CPU")
    assert "| stage | variant | s/step | samples/s | LLM tokens/s | peak GiB | TFLOP/step | MFU |" in proc.stdout
    assert report["peak_bf16_flops"] == 2e12 and report["shapes"]["steps"] == 2
    assert [(r["stage"], r["variant"]) for r in report["rows"]] == [(s, "baseline") for s in bench_gpu.STAGES]
    for row in report["rows"]:
        assert "error" not in row, row
        assert row["s_per_step"] > 0 and row["llm_tokens_per_step"] > 0 and math.isfinite(row["loss_last"])
        assert row["peak_memory_gib"] is None  # no CUDA allocator on CPU
        assert row["samples_per_s"] == pytest.approx(2 / row["s_per_step"])
        assert row["achieved_tflops"] == pytest.approx(row["model_tflop_per_step"] / row["s_per_step"])
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 2)
    by_stage = {r["stage"]: r for r in report["rows"]}
    # the teacher's forward is on top of the same student steps as stage 2's
    assert by_stage["distill"]["model_tflop_per_step"] > by_stage["asr"]["model_tflop_per_step"]


def test_the_align_step_counts_the_rows_the_llm_reads():
    """Stage 1's tiny step by hand: the rows its LLM reads, its prefix from the cache (frozen LLM)."""
    shapes = bench_gpu.TINY
    cfg = bench_gpu.stage_config("align", [], shapes)
    module = bench_gpu.build_module(cfg, shapes, "cpu")
    counter = bench_gpu.flop_counter(module, shapes, "align")
    counter.install()
    batch = bench_gpu.stage_batch("align", shapes)
    model = module.model
    feats, lengths = model.encoder.encode_text(batch["text"], module.sample_generators(batch))
    out = model(feats, lengths, model.target_ids(batch["target"]))
    flops, tokens = counter.take()
    counter.uninstall()
    assert "labelled_hidden" not in model.__dict__ and "forward" not in model.projector.__dict__

    prefix, suffix = len(model.prompt.prefix_ids), len(model.prompt.suffix_ids)
    rows = [prefix + int(n) + suffix + shapes.target_tokens + 1 for n in lengths]  # + EOS
    labelled = len(rows) * (shapes.target_tokens + 1)
    llm = shapes.llm
    expected = sum((s - prefix) * bench_gpu.model_flops_per_token(llm, s, backward=True) for s in rows)
    expected += labelled * 4 * llm["hidden_size"] * llm["vocab_size"]
    expected += 6 * sum(p.numel() for p in model.projector.parameters()) * int(lengths.sum())
    assert tokens == sum(rows) - len(rows) * prefix
    assert flops == pytest.approx(expected)
    assert out["loss"].requires_grad


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_bench_gpu_stops_with_a_clear_message(tmp_path, capsys):
    from stages.__main__ import main

    assert main(["bench", "gpu", "--no-pipeline", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "run it on a GPU node" in err and "--device cpu --tiny" in err
    assert not (tmp_path / "gpu.json").exists()


def test_missing_demo_inputs_fall_back_to_the_tiny_pipeline_which_runs(tmp_path, monkeypatch):
    pipeline = tmp_path / "needs.yaml"
    pipeline.write_text((REPO / "configs/pipeline/tiny.yaml").read_text()
                        .replace("data/tiny/", "data/absent/")
                        .replace("../model/", f"{REPO}/configs/model/").replace("../stage/", f"{REPO}/configs/stage/"))
    monkeypatch.chdir(tmp_path)  # the tiny pipeline's data/tiny is prepared here
    assert "align: data/absent/text/train.jsonl does not exist" in bench_gpu.missing_inputs(str(pipeline))

    chosen, note = bench_gpu.pipeline_to_run(str(pipeline))
    assert chosen == bench_gpu.TINY_PIPELINE and "cannot run here" in note and "prepared into data/tiny" in note
    assert bench_gpu.missing_inputs(chosen) == []
    rows = bench_gpu.run_pipeline_once(chosen, tmp_path / "run", "cpu", steps=2, only=["align"])
    assert rows[0]["stage"] == "align" and rows[0]["result"] == "passed", rows
    assert rows[0]["steps"] == 2 and rows[0]["s_per_step"] > 0
    assert rows[-1]["result"] == "exit status 0"
