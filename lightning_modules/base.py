"""What every stage shares: the model, optimiser groups and schedules, trainable-only checkpoints
with RNG state, throughput logging and speech validation with WER per named set."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from speechllm.config import OptimConfig, StageConfig
from speechllm.metrics import corpus_errors
from speechllm.model import SpeechLLM


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base LR at a step: linear warm-up, then constant / cosine / WSD decay."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "wsd":
            decay_start = max_steps * (1 - cfg.decay_fraction)
            if step < decay_start:
                return 1.0
            return floor + (1 - floor) * max(0.0, (max_steps - step) / max(1.0, max_steps - decay_start))
        raise ValueError(f"unknown optim.schedule {cfg.schedule!r} (constant | cosine | wsd)")

    return factor


class SpeechLLMModule(L.LightningModule):
    def __init__(self, cfg: StageConfig):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.model = SpeechLLM.build(cfg.model)
        if cfg.init_from:
            self.init_from(cfg.init_from)
        # Checkpoints hold trainable weights only; the frozen parts come from their ids on load.
        self.strict_loading = False
        self._eval_outputs: dict[int, list[tuple[str, str, str]]] = {}
        self._last_step_end: float | None = None

    def init_from(self, directory: str) -> None:
        """Start from a previous stage's exported trainable weights (not a resume)."""
        path = Path(directory) / "trainable.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"init_from: {path} not found (is the previous stage DONE?)")
        self.model.load_trainable(load_file(str(path)), str(path))

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        optim = self.cfg.optim
        groups = {"projector": [], "llm": [], "other": []}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                key = name.split(".", 1)[0]
                groups[key if key in groups else "other"].append(p)
        lr_llm = optim.lr_llm if optim.lr_llm is not None else optim.lr
        param_groups = [
            {"params": groups["projector"] + groups["other"], "lr": optim.lr, "name": "projector"},
            {"params": groups["llm"], "lr": lr_llm, "name": "llm"},
        ]
        param_groups = [g for g in param_groups if g["params"]]
        kwargs = {"betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
        if optim.optimizer == "adamw":
            opt = torch.optim.AdamW(param_groups, **kwargs)
        elif optim.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(param_groups, **kwargs)
        else:
            raise ValueError(f"unknown optim.optimizer {optim.optimizer!r} (adamw | adamw8bit)")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, self.cfg.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # Plain tensors and numbers only, so the checkpoint loads with torch.load(weights_only=True).
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ logging helpers

    def log_step(self, out: dict, batch_size: int) -> None:
        """Loss, learning rates and throughput (samples/s, LLM tokens/s) of one training step."""
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=batch_size)
        now = time.perf_counter()
        if self._last_step_end is not None:
            dt = max(now - self._last_step_end, 1e-9)
            self.log("train/samples_per_s", batch_size / dt, batch_size=batch_size)
            self.log("train/llm_tokens_per_s", batch_size * out["seq_len"] / dt, batch_size=batch_size)
        self._last_step_end = now
        self.log("train/seq_len", float(out["seq_len"]), batch_size=batch_size)

    # ------------------------------------------------------------------ evaluation: WER per named set

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = {}

    def on_test_epoch_start(self) -> None:
        self._eval_outputs = {}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        hyps = self.model.transcribe(batch["waveform"])
        self._eval_outputs.setdefault(dataloader_idx, []).extend(zip(batch["id"], batch["target"], hyps))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_wer("val", self.trainer.datamodule.val_names if self.trainer.datamodule else [])

    def on_test_epoch_end(self) -> None:
        self._log_wer("test", self.trainer.datamodule.test_names if self.trainer.datamodule else [])

    def _log_wer(self, prefix: str, names: list[str]) -> None:
        for idx, name in enumerate(names):
            rows = self._eval_outputs.get(idx, [])
            total, _ = corpus_errors([r for _, r, _ in rows], [h for _, _, h in rows], "whisper")
            counts = torch.tensor([total.substitutions, total.deletions, total.insertions, total.ref_words],
                                  dtype=torch.float64, device=self.device)
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")  # sum over ranks
            errors, ref_words = counts[:3].sum(), counts[3].clamp(min=1)
            self.log(f"{prefix}/{name}/wer", (errors / ref_words).float(), add_dataloader_idx=False)
            if self.global_rank == 0 and rows:
                self.log_text_samples(f"{prefix}/{name}", rows)

    def log_text_samples(self, name: str, rows: list[tuple[str, str, str]]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        lines = [f"**{uid}**  \nREF: {ref}  \nHYP: {hyp}" for uid, ref, hyp in rows[: self.cfg.trainer.log_text_samples]]
        experiment.add_text(f"{name}/samples", "\n\n".join(lines), self.global_step)
