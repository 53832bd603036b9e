"""Stage steps at a real model size on one CUDA device: tokens/s, samples/s, peak memory and MFU, with and
without the speed switches; then every stage of a pipeline run once on the device.

``python -m stages bench gpu [--only SUBSTRING ...] [--batch-size 16] [--peak-tflops T] [--no-pipeline]``
(``make bench-gpu``). Without CUDA it stops with an error; ``--device cpu --tiny`` runs the same code on
tiny shapes for 2 steps (the test drives it).

Models, random weights from configs (nothing downloaded): a Qwen2.5-1.5B-shaped LLM (``QWEN25_1_5B``;
its vocabulary is the character tokenizer's of a from-config LLM, so the embedding is resized to 151936
after the build) and a Whisper-small-shaped encoder (``WHISPER_SMALL``). Each (stage, variant) runs in a
fresh process: the stage's real LightningModule is built on the device and trained by a plain
``L.Trainer`` (bf16-mixed over float32 weights, as ``trainer.precision=auto`` on a bf16 GPU; the stage's
AdamW groups, LR schedule and gradient clipping; no logger, checkpoint or validation) on one pre-built
batch, repeated: ``warmup`` steps, then ``steps`` timed ones (whole steps, the device synchronised).
Default batch: 16 utterances of 10 s of noise, targets of 30 tokens (random words of 30 characters: the
from-config LLM's character tokenizer makes each a token; the prompt is spelled in characters too).

- align (stage 1, ``AlignModule``): TASU's text side, CPS-simulated CTC posteriors over the tiny preset's
  character units. The text side needs a CTC encoder, and the speech encoder never runs in stage 1, so
  Whisper plays no part here; the LLM is frozen (as in TASU), the projector trains.
- asr (stage 2, ``CurriculumASRModule``, speech batches): Whisper-small states, 5 frames stacked (10 Hz),
  projector, LLM with LoRA r 16 (TASU2). These are the stage-2-style speech steps through
  ``SpeechLLM.forward``.
- distill (stage 3, ``DistillModule``, alpha 1, ``distill.format=instruction``): the student hears the
  speech (LoRA r 16); the teacher, the same LLM with LoRA off, reads the transcript.

Variants: ``VARIANTS`` (model.pack_sequences, model.loss_kernel=liger, model.llm.gradient_checkpointing).

Model FLOPs of a step, counted from the configs while the last warm-up step runs (every step reads the
same batch), and MFU = model FLOPs per step / seconds per step / the device's peak dense bf16 FLOP/s
(``PEAK_BF16_FLOPS`` by device name, or ``--peak-tflops``):

    N     non-embedding parameters of the LLM (per layer q, k, v, o with their biases, gate, up, down,
          two norms; and the final norm). The LM head is counted apart: 2 d V per position it runs on
          (only positions that predict a labelled token, speechllm.losses).
    N_a   LoRA adapter parameters, r (d_in + d_out) per adapted matrix and layer.
    N_t   LLM weights that train: N_a with LoRA, N in a full fine-tune, 0 when frozen.
    L, d_attn  layers, heads x head_dim.

    One LLM pass over rows of s_i tokens, c_i of them computed (c_i = s_i less the prompt prefix when a
    frozen LLM reads it from its key/value cache), P labelled positions:
      forward   sum_i c_i (2 (N + N_a) + 4 L s_i d_attn)  +  P 2 d V
                (attention: QK^T and AV, 2 s d_attn each per token and layer, over the whole row;
                causal masking is not halved)
      backward, in every pass with gradients (the student's; they reach the projector through a frozen
      LLM too):
                sum_i c_i (2 (N + N_a) + 8 L s_i d_attn)  +  P 2 d V     activation gradients
              + sum_i c_i 2 N_t  (+ P 2 d V if the head trains)           weight gradients
      A pass without gradients is the teacher's: forward only, adapters off (N_a = 0).
    Encoder (frozen): forward only, 2 x parameters x the positions they run on (conv1 per mel frame M,
      conv2 and the layers per output frame T = (M - 1) // 2 + 1) + 4 L T^2 d per clip.
    Projector (trains): 6 x its parameters per input vector.
    Recomputation (activation checkpointing, the chunked loss's head) is not model FLOPs. Tokens/s counts
    the student's computed row tokens (sum c_i), padding excluded.

Then ``stages run --pipeline`` (default: the demo) with every enabled stage for 3 steps, tiny evaluation
sets and ``trainer.accelerator=gpu``: pass or fail and the mean step time per stage. When its data or
assets are not on the machine this says so and runs the tiny pipeline (configs/pipeline/tiny.yaml,
its synthetic data prepared into data/tiny when missing) instead.

Results: ``<out>/gpu.json`` and a printed markdown table with the device's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_PIPELINE = str(REPO / "configs/pipeline/tiny.yaml")  # its data paths are relative to the working directory
PRECISION = "bf16-mixed"

# Qwen2.5-1.5B's shapes (its config.json), written here so nothing is downloaded.
QWEN25_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
               "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True,
               "rope_theta": 1_000_000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}
# Whisper-small's encoder.
WHISPER_SMALL = {"d_model": 768, "encoder_layers": 12, "encoder_attention_heads": 12, "encoder_ffn_dim": 3072,
                 "num_mel_bins": 80, "max_source_positions": 1500}
TINY_LLM = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1024, "tie_word_embeddings": True,
            "rope_theta": 1_000_000.0, "max_position_embeddings": 2048}
TINY_WHISPER = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                "num_mel_bins": 80, "max_source_positions": 1500}

STAGES = ("align", "asr", "distill")
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "packed (model.pack_sequences)": ["model.pack_sequences=true"],
    "liger loss (model.loss_kernel=liger)": ["model.loss_kernel=liger"],
    "activation checkpointing": ["model.llm.gradient_checkpointing=true"],
}

# Dense bf16 tensor-core peaks (vendors' datasheets, without sparsity), the most specific name first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"GH200", 989e12), (r"H200", 989e12), (r"H100", 989e12),
    (r"B200", 2250e12), (r"A100", 312e12), (r"L40S", 362e12), (r"\bL4\b", 121e12), (r"\bA10\b", 125e12),
)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The model sizes and the batch of a bench run."""

    about: str
    llm: dict
    encoder: dict
    projector_hidden: int
    batch_size: int
    audio_seconds: float
    target_tokens: int
    warmup: int
    steps: int


FULL = Shapes("Qwen2.5-1.5B-shaped LLM, Whisper-small-shaped encoder", QWEN25_1_5B, WHISPER_SMALL, 2048,
              batch_size=16, audio_seconds=10.0, target_tokens=30, warmup=3, steps=10)
TINY = Shapes("tiny shapes (a check of the code path, not a measurement)", TINY_LLM, TINY_WHISPER, 64,
              batch_size=2, audio_seconds=1.0, target_tokens=8, warmup=1, steps=2)


# ------------------------------------------------------------------------------------- model FLOPs


def _attention_dims(cfg: dict) -> tuple[int, int]:
    """(heads x head_dim, key/value heads x head_dim) of a decoder config."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return heads * head_dim, cfg.get("num_key_value_heads", heads) * head_dim


def _matrix_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each weight matrix of one decoder layer."""
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = _attention_dims(cfg)
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}


def non_embedding_params(cfg: dict) -> int:
    """N: the parameters of a Llama/Qwen2 decoder config, less the token embedding and the LM head."""
    kind = cfg.get("model_type", "llama")
    if kind not in ("llama", "qwen2"):
        raise ValueError(f"non_embedding_params counts llama and qwen2 decoders, not {kind!r}")
    d = cfg["hidden_size"]
    q, kv = _attention_dims(cfg)
    shapes = _matrix_shapes(cfg)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * d  # the matrices and two RMSNorm weights
    if kind == "qwen2":
        per_layer += q + 2 * kv  # Qwen2: q, k and v always have a bias
    elif cfg.get("attention_bias", False):
        per_layer += q + 2 * kv + d
    if kind == "llama" and cfg.get("mlp_bias", False):
        per_layer += 2 * cfg["intermediate_size"] + d
    return cfg["num_hidden_layers"] * per_layer + d  # + the final norm


def lora_params(cfg: dict, r: int, target_modules: list[str]) -> int:
    """N_a: r (d_in + d_out) per adapted matrix and layer."""
    shapes = _matrix_shapes(cfg)
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"lora_params knows the decoder matrices {sorted(shapes)}, not {unknown}")
    return cfg["num_hidden_layers"] * sum(r * sum(shapes[m]) for m in target_modules)


def model_flops_per_token(cfg: dict, seq_len: int, *, backward: bool = False, adapters: int = 0,
                          trained: int = 0) -> float:
    """FLOPs of one computed token of a row of ``seq_len`` tokens through the LLM's layers (the LM head
    apart: :func:`head_flops_per_position`). ``adapters``: N_a switched on; ``trained``: N_t."""
    attention = 4 * cfg["num_hidden_layers"] * seq_len * _attention_dims(cfg)[0]
    forward = 2 * (non_embedding_params(cfg) + adapters) + attention
    if not backward:
        return float(forward)
    return float(forward + 2 * (non_embedding_params(cfg) + adapters) + 2 * attention + 2 * trained)


def head_flops_per_position(cfg: dict, *, backward: bool = False, trains: bool = False) -> float:
    """The LM head's FLOPs at one position it runs on: 2 d V forward, as much again for the gradient of
    its input, and again for its weight when it trains."""
    one = 2 * cfg["hidden_size"] * cfg["vocab_size"]
    return float(one * (1 + backward + (backward and trains)))


def whisper_encoder_params(cfg: dict) -> tuple[int, int, int]:
    """(conv1, conv2, the layers and the final norm) parameters of a Whisper encoder config; the
    positional table does no arithmetic and is left out."""
    d, ffn, mel = cfg["d_model"], cfg["encoder_ffn_dim"], cfg["num_mel_bins"]
    conv1, conv2 = 3 * mel * d + d, 3 * d * d + d
    # q, v and out with biases, k without; fc1, fc2 with biases; two LayerNorms (weight and bias)
    layer = 4 * d * d + 3 * d + 2 * d * ffn + ffn + d + 4 * d
    return conv1, conv2, cfg["encoder_layers"] * layer + 2 * d


def encoder_flops(cfg: dict, mel_frames: int) -> float:
    """Forward FLOPs of the Whisper encoder on one clip of ``mel_frames`` log-mel frames."""
    conv1, conv2, rest = whisper_encoder_params(cfg)
    frames = (mel_frames - 1) // 2 + 1  # conv2: stride 2
    attention = 4 * cfg["encoder_layers"] * frames * frames * cfg["d_model"]
    return float(2 * conv1 * mel_frames + 2 * (conv2 + rest) * frames + attention)


class StepFlops:
    """Model FLOPs and computed LLM tokens of the passes a step makes (the formula of the module
    docstring), counted as they run by wrapping the SpeechLLM methods every pass goes through."""

    def __init__(self, model, llm_cfg: dict, encoder_cfg: dict | None, *, adapters: int, trained: int):
        self.model, self.llm_cfg, self.encoder_cfg = model, llm_cfg, encoder_cfg
        self.adapters, self.trained = adapters, trained
        self.prefix = len(model.prompt.prefix_ids)
        self.head_trains = any(p.requires_grad for p in model.lm_head.parameters())
        self.projector_params = sum(p.numel() for p in model.projector.parameters())
        self.flops, self.tokens, self._cached = 0.0, 0, False
        self._wrapped: list[tuple[object, str]] = []

    def _wrap(self, owner, name: str, make) -> None:
        """``owner.name`` replaced, on the instance, by ``make(the original)``."""
        setattr(owner, name, make(getattr(owner, name)))
        self._wrapped.append((owner, name))

    def install(self) -> None:
        import torch

        def labelled_hidden(original):
            def counted(rows, *args, **kwargs):
                self._cached = False
                hidden, targets = original(rows, *args, **kwargs)
                self.llm_pass([len(r) for r in rows], hidden.shape[0], backward=torch.is_grad_enabled())
                return hidden, targets
            return counted

        def prefix_cache(original):
            def counted(*args, **kwargs):
                self._cached = True  # this pass reads the prompt prefix from the cache: it is not computed
                return original(*args, **kwargs)
            return counted

        def project(original):
            def counted(feats, lengths):
                out, out_lengths = original(feats, lengths)
                self.flops += 6 * self.projector_params * int(out_lengths.sum())
                return out, out_lengths
            return counted

        def forward_mel(original):
            def counted(mel, mel_lengths):
                self.flops += sum(encoder_flops(self.encoder_cfg, m) for m in mel_lengths.tolist())
                return original(mel, mel_lengths)
            return counted

        self._wrap(self.model, "labelled_hidden", labelled_hidden)
        self._wrap(self.model, "prefix_cache", prefix_cache)
        self._wrap(self.model.projector, "forward", project)
        if self.encoder_cfg is not None:
            self._wrap(self.model.encoder, "forward_mel", forward_mel)

    def uninstall(self) -> None:
        """Back to the classes' own methods (the timed steps run unwrapped)."""
        for owner, name in self._wrapped:
            del owner.__dict__[name]
        self._wrapped = []

    def llm_pass(self, row_lengths: list[int], labelled: int, *, backward: bool) -> None:
        adapters = self.adapters if backward else 0  # a pass without gradients is the teacher's: adapters off
        for s in row_lengths:
            computed = s - self.prefix if self._cached else s
            self.flops += computed * model_flops_per_token(self.llm_cfg, s, backward=backward, adapters=adapters,
                                                           trained=self.trained)
            self.tokens += computed if backward else 0
        self.flops += labelled * head_flops_per_position(self.llm_cfg, backward=backward, trains=self.head_trains)

    def take(self) -> tuple[float, int]:
        """The FLOPs and tokens counted since the last take."""
        counted, self.flops, self.tokens = (self.flops, self.tokens), 0.0, 0
        return counted


def peak_flops(device_name: str, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """The device's peak dense bf16 FLOP/s and where it came from (None: unknown, MFU n/a)."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops, f"the table ({pattern})"
    return None, "unknown device: MFU n/a (give --peak-tflops)"


# ------------------------------------------------------------------------------------- one measurement

WORDS = ("the a cat dog sat ran on under mat big small red blue we you they see saw go went home now then "
         "here there good bad fast slow").split()


def sentence(chars: int, rng: random.Random) -> str:
    """Random words cut to ``chars`` characters: as many tokens for a from-config LLM's character tokenizer."""
    text = ""
    while len(text) < chars:
        text += rng.choice(WORDS) + " "
    text = text[:chars]
    return text[:-1] + "s" if text.endswith(" ") else text


def word_times(text: str, seconds: float) -> list[dict]:
    words = text.split()
    step = seconds / len(words)
    return [{"w": w, "start": round(i * step, 4), "end": round((i + 1) * step, 4)} for i, w in enumerate(words)]


def stage_batch(stage: str, shapes: Shapes, sample_rate: int = 16000, seed: int = 0) -> dict:
    """One batch as the stage's data module yields it: texts for align, noise clips with transcripts
    (and word times) for asr and distill."""
    import torch

    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    texts = [sentence(shapes.target_tokens, rng) for _ in range(shapes.batch_size)]
    batch = {"id": [f"bench{i}" for i in range(len(texts))], "seed": list(range(len(texts))), "text": texts,
             "target": list(texts)}
    if stage == "align":
        return {**batch, "source": "simulated", "kind": "simulated"}
    samples = int(shapes.audio_seconds * sample_rate)
    waves = [0.1 * torch.randn(samples, generator=generator) for _ in texts]
    return {**batch, "source": "speech", "kind": "speech", "waveform": waves,
            "words": [word_times(t, shapes.audio_seconds) for t in texts]}


def repeated(batch: dict):
    """A loader that yields ``batch`` forever (no length, so no epoch ends and no check against it)."""
    from torch.utils.data import DataLoader, IterableDataset

    class Repeat(IterableDataset):
        def __iter__(self):
            return itertools.repeat(batch)

    return DataLoader(Repeat(), batch_size=None, collate_fn=lambda b: b)


def stage_config(stage: str, overrides: list[str], shapes: Shapes):
    """The stage's preset (configs/stage) with the bench's models, and the variant's overrides."""
    from omegaconf import OmegaConf

    from speechllm.config import load_stage_config

    llm = {k: v for k, v in shapes.llm.items() if k != "vocab_size"}  # resized after the build (module docstring)
    if stage == "align":  # the tiny preset's CTC encoder: stage 1 runs only its text side (CPS)
        encoder = OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml").model.encoder)
    else:
        encoder = {"kind": "whisper", "from_config": shapes.encoder}
    model = {"encoder": encoder, "llm": {"from_config": llm}, "prompt": {"task_prompt": "Transcribe:"},
             "projector": {"hidden_dim": shapes.projector_hidden, "stack_frames": 1 if stage == "align" else 5}}
    bench = {"model": model, "trainer": {"max_steps": shapes.warmup + shapes.steps, "precision": PRECISION}}
    if stage == "asr":
        bench["model"]["llm"]["lora"] = {"enabled": True}
    if stage == "distill":
        bench["distill"] = {"format": "instruction", "alpha": 1.0}
    return load_stage_config([(f"configs/stage/{stage}.yaml", REPO / f"configs/stage/{stage}.yaml"),
                              ("bench gpu", bench)], overrides)


def build_module(cfg, shapes: Shapes, device: str):
    """The stage's LightningModule, built on the device, with the LLM's vocabulary at its real size."""
    import torch

    from lightning_modules import STAGE_KINDS

    torch.manual_seed(0)
    with torch.device(device):  # weights created and initialised on the device: seconds, not minutes
        module = STAGE_KINDS[cfg.kind](cfg)
        module.model.llm.resize_token_embeddings(shapes.llm["vocab_size"], mean_resizing=False)
    return module


def flop_counter(module, shapes: Shapes, stage: str) -> StepFlops:
    llm = module.cfg.model.llm
    adapters = lora_params(shapes.llm, llm.lora.r, list(llm.lora.target_modules)) if llm.lora.enabled else 0
    trained = adapters if llm.lora.enabled else (0 if llm.freeze else non_embedding_params(shapes.llm))
    return StepFlops(module.model, shapes.llm, None if stage == "align" else shapes.encoder,
                     adapters=adapters, trained=trained)


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps_callback(warmup: int, device: str, counter: StepFlops):
    """A callback that counts the FLOPs of the last warm-up step, then times the steps after it and
    resets the peak memory before them."""
    import lightning as L
    import torch

    class TimedSteps(L.Callback):
        def __init__(self):
            self.start = self.end = None
            self.flops, self.tokens, self.loss = 0.0, 0, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == warmup - 1:
                counter.install()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            _synchronize(device)
            self.end = time.perf_counter()
            if batch_idx == warmup - 1:
                self.flops, self.tokens = counter.take()
                counter.uninstall()
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()
            if trainer.global_step >= trainer.max_steps:
                self.loss = float(outputs["loss"])

    return TimedSteps()


def measure(stage: str, variant: str, shapes: Shapes, device: str) -> dict:
    """Train the stage for warm-up + timed steps on the device; one row of the table."""
    import lightning as L
    import torch

    cfg = stage_config(stage, VARIANTS[variant], shapes)
    module = build_module(cfg, shapes, device)
    timer = timed_steps_callback(shapes.warmup, device, flop_counter(module, shapes, stage))
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=PRECISION,
                        max_steps=shapes.warmup + shapes.steps, max_epochs=-1,
                        gradient_clip_val=cfg.trainer.gradient_clip_val or None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=repeated(stage_batch(stage, shapes, module.model.encoder.sample_rate)))
    seconds = (timer.end - timer.start) / shapes.steps
    return {"stage": stage, "variant": variant, "overrides": VARIANTS[variant], "s_per_step": seconds,
            "samples_per_s": shapes.batch_size / seconds, "llm_tokens_per_step": timer.tokens,
            "llm_tokens_per_s": timer.tokens / seconds, "model_tflop_per_step": timer.flops / 1e12,
            "achieved_tflops": timer.flops / seconds / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "loss_last": timer.loss}


# ------------------------------------------------------------------------------------- the runs


def shape_arguments(shapes: Shapes, device: str, tiny: bool) -> list[str]:
    """The command-line options that give a worker process these shapes."""
    return ["--device", device, *(["--tiny"] if tiny else []), "--batch-size", str(shapes.batch_size),
            "--audio-seconds", str(shapes.audio_seconds), "--target-tokens", str(shapes.target_tokens),
            "--warmup", str(shapes.warmup), "--steps", str(shapes.steps)]


def error_line(stderr: str, returncode: int) -> str:
    """The line of a failed process's stderr that names the error (else its last line)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else f"exit status {returncode}")


def run_worker(stage: str, variant: str, worker_args: list[str], timeout_s: int = 300) -> dict:
    """One measurement in a fresh process: a failure, an out-of-memory or a kernel patched by a variant
    stays in it, and its peak memory is its own."""
    cmd = [sys.executable, "-m", "stages.bench_gpu", "--worker", stage, variant, *worker_args]
    failed = {"stage": stage, "variant": variant, "overrides": VARIANTS[variant]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {timeout_s} s"}
    if proc.returncode != 0:
        return {**failed, "error": error_line(proc.stderr, proc.returncode)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def local_inputs(cfg) -> list[str]:
    """The local files and folders a stage reads its data from (source strings such as hf:... left out)."""
    d, m = cfg.data, cfg.measures
    paths = [d.train, *(s.manifest for s in d.sources.values()), *d.val.values(), *d.test.values(),
             *m.sets.values(), *m.multiple_choice.values(), cfg.selection.pool if cfg.kind == "select" else None]
    return [p for p in paths if p and ":" not in p.split("/")[0]]


def missing_inputs(pipeline: str) -> list[str]:
    """What the enabled stages of a pipeline need on disk and do not find: models and data."""
    from speechllm.config import missing_model_paths
    from stages.runner import resolve_stage_configs

    if not Path(pipeline).is_file():
        return [f"{pipeline} does not exist"]
    missing = []
    for name, _, cfg in resolve_stage_configs(pipeline, []):
        if cfg.enabled:
            missing += [f"{name}: {key}: {problem}" for key, problem in missing_model_paths(cfg.model)]
            missing += [f"{name}: {path} does not exist" for path in local_inputs(cfg) if not Path(path).exists()]
    return missing


def pipeline_to_run(requested: str) -> tuple[str, str]:
    """The pipeline to run once, and a note: the requested one, or the tiny pipeline when the requested
    one's data or assets are not on this machine (the tiny one's synthetic data prepared if missing)."""
    missing = missing_inputs(requested)
    if not missing:
        return requested, f"{requested}: its inputs are all here"
    note = "" if Path(requested).resolve() == Path(TINY_PIPELINE) else (
        f"{requested} cannot run here: {len(missing)} input(s) missing, e.g. {missing[0]} "
        f"(`make demo` prepares the demo's); ran {TINY_PIPELINE} instead")
    if missing_inputs(TINY_PIPELINE):
        from stages.prepare_tiny_data import prepare_tiny_data

        prepare_tiny_data(Path("data/tiny"))
        note += " (its synthetic data prepared into data/tiny)"
    return TINY_PIPELINE, note.strip()


def pipeline_overrides(accelerator: str, steps: int) -> list[str]:
    """A few training steps per stage and tiny evaluation sets, on the accelerator."""
    return [f"trainer.accelerator={accelerator}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}",
            f"trainer.checkpoint_every_n_steps={steps}", "trainer.evaluate_before_training=false",
            "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "data.val_max_samples=4", "data.test_max_samples=4",
            "measures.max_samples=4", "measures.mc_max_samples=4"]


def run_pipeline_once(pipeline: str, run_dir: Path, accelerator: str, steps: int = 3,
                      only: list[str] | None = None, timeout_s: int = 900) -> list[dict]:
    """Every enabled stage (or the ``only`` ones) of ``pipeline`` for ``steps`` steps in one
    ``stages run``; per stage: passed or failed (with the error), its steps and mean seconds per step
    (the first step included)."""
    from stages.runner import resolve_stage_configs

    overrides = pipeline_overrides(accelerator, steps)
    stages = [(name, stage_dir) for name, stage_dir, cfg in resolve_stage_configs(pipeline, overrides, str(run_dir))
              if cfg.enabled and (not only or name in only)]
    # --only each stage, --redo --force: a previous bench's finished stages are moved aside and run again.
    cmd = [sys.executable, "-m", "stages", "run", pipeline, "--run-dir", str(run_dir), "--redo", "--force",
           *(arg for name, _ in stages for arg in ("--only", name)), *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        error, status = error_line(proc.stderr, proc.returncode), f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = status = f"timed out after {timeout_s} s"
    wall = time.perf_counter() - start
    rows, failed = [], False
    for name, stage_dir in stages:
        if stage_dir.done.is_file():
            metrics = json.loads(stage_dir.metrics.read_text())
            rows.append({"stage": name, "result": "passed", "steps": metrics["steps"],
                         "s_per_step": metrics["train_step_s_mean"], "wall_s": metrics["wall_time_s_this_run"]})
        else:
            rows.append({"stage": name, "result": "not run (an earlier stage failed)" if failed else "failed",
                         **({} if failed else {"error": error})})
            failed = True
    return [*rows, {"stage": "(all)", "result": status, "wall_s": round(wall, 1)}]


# ------------------------------------------------------------------------------------- the report


def _cell(value, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else format(value, fmt) + unit


def markdown(report: dict) -> str:
    peak, shapes = report["peak_bf16_flops"], report["shapes"]
    lines = [f"### bench gpu on {report['device']} (peak dense bf16 {_cell(peak and peak / 1e12, '.0f')} TFLOP/s: "
             f"{report['peak_source']})", "",
             f"{shapes['about']}; batch {shapes['batch_size']} x {shapes['audio_seconds']:g} s, targets "
             f"{shapes['target_tokens']} tokens; {shapes['warmup']} warm-up + {shapes['steps']} timed steps; {PRECISION}", "",
             "| stage | variant | s/step | samples/s | LLM tokens/s | peak GiB | TFLOP/step | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['variant']} | failed: {r['error'][:160]} ||||||")
            continue
        mfu = r["mfu"] and 100 * r["mfu"]
        lines.append(f"| {r['stage']} | {r['variant']} | {r['s_per_step']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['llm_tokens_per_s']:.0f} | {_cell(r['peak_memory_gib'], '.2f')} | "
                     f"{r['model_tflop_per_step']:.4g} | {_cell(mfu, '.1f', ' %')} |")
    if report.get("pipeline"):
        lines += ["", f"Every stage once on the device: {report['pipeline']['note']}", "",
                  "| pipeline stage | result | steps | s/step | wall s |", "|---|---|---:|---:|---:|"]
        for r in report["pipeline"]["stages"]:
            result = r["result"] + (f": {r['error'][:160]}" if "error" in r else "")
            lines.append(f"| {r['stage']} | {result} | {r.get('steps', '')} | {_cell(r.get('s_per_step'), '.3f')} | "
                         f"{_cell(r.get('wall_s'), '.1f')} |")
    lines += ["", f"whole bench: {report['wall_s']:.0f} s"]
    return "\n".join(lines)


def device_name(device: str) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


def add_options(parser) -> None:
    """The options of ``bench gpu`` besides --pipeline, --steps, --out and --only (which ``stages bench`` shares)."""
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="gpu: cuda (default), or cpu to check the code path (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="gpu: tiny shapes, 1 warm-up + 2 steps (a code check)")
    parser.add_argument("--peak-tflops", type=float, help="gpu: the device's peak dense bf16 TFLOP/s, for MFU "
                        "(default: from the table of known devices)")
    parser.add_argument("--no-pipeline", action="store_true", help="gpu: measure the stages only, no pipeline run")
    parser.add_argument("--batch-size", type=int, help="gpu: utterances per step (default 16; tiny 2)")
    parser.add_argument("--audio-seconds", type=float, help="gpu: seconds per utterance (default 10; tiny 1)")
    parser.add_argument("--target-tokens", type=int, help="gpu: target tokens per utterance (default 30; tiny 8)")
    parser.add_argument("--warmup", type=int, help="gpu: untimed steps first (default 3; tiny 1; at least 1)")


def shapes_from(args: argparse.Namespace) -> Shapes:
    base = TINY if args.tiny else FULL
    given = {"batch_size": args.batch_size, "audio_seconds": args.audio_seconds, "target_tokens": args.target_tokens,
             "warmup": args.warmup, "steps": args.steps}
    shapes = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    if shapes.warmup < 1 or shapes.steps < 1:
        raise SystemExit("error: bench gpu needs --warmup >= 1 (its FLOPs are counted) and --steps >= 1")
    return shapes


def run(args: argparse.Namespace) -> int:
    """``bench gpu`` with the options of :func:`add_options` and --pipeline, --steps, --out, --only."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device: bench gpu measures stage steps on a GPU; run it on a GPU node; "
              "--device cpu --tiny checks the code path", file=sys.stderr)
        return 2
    start = time.perf_counter()
    shapes = shapes_from(args)
    worker_args = shape_arguments(shapes, args.device, args.tiny)
    rows = []
    for stage, variant in itertools.product(STAGES, VARIANTS):
        name = f"{stage}: {variant}"
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"[bench gpu] {name}", flush=True)
        rows.append(run_worker(stage, variant, worker_args))
    device = device_name(args.device)
    peak, source = peak_flops(device, args.peak_tflops)
    for r in rows:
        if "error" not in r:
            r["mfu"] = r["achieved_tflops"] * 1e12 / peak if peak else None
    report = {"device": device, "peak_bf16_flops": peak, "peak_source": source,
              "shapes": dataclasses.asdict(shapes), "precision": PRECISION, "rows": rows}
    if not args.no_pipeline:
        print("[bench gpu] every stage of a pipeline once on the device", flush=True)
        pipeline, note = pipeline_to_run(args.pipeline)
        accelerator = "gpu" if args.device == "cuda" else "cpu"
        report["pipeline"] = {"pipeline": pipeline, "note": note,
                              "stages": run_pipeline_once(pipeline, args.out / "pipeline", accelerator)}
    report["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1))
    print("\n" + markdown(report) + f"\n\n-> {args.out / 'gpu.json'}")
    return 0 if any("error" not in r for r in rows) or not rows else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="configs/pipeline/demo.yaml",
                        help="pipeline whose stages run once on the device (default: %(default)s; the tiny "
                             "pipeline when its data or assets are missing)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 10; tiny 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder of gpu.json and the pipeline run")
    parser.add_argument("--only", nargs="*", help="substrings of 'stage: variant' names to run")
    parser.add_argument("--worker", nargs=2, metavar=("STAGE", "VARIANT"), help=argparse.SUPPRESS)
    add_options(parser)
    args = parser.parse_args(argv)
    if args.worker:  # one measurement, its row as JSON on the last line of stdout
        print(json.dumps(measure(*args.worker, shapes_from(args), args.device)))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
