"""What every stage shares: the model, optimiser groups and schedules, trainable-only checkpoints
with RNG state, a guard against non-finite steps, and logging (loss, learning rates, throughput,
the data mixture, counted skips). Validation lives in :mod:`lightning_modules.evaluation`."""

from __future__ import annotations

import json
import math
import random
import time
from functools import wraps
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from datamodules.sampling import sample_seed
from lightning_modules.evaluation import EvaluationMixin
from speechllm.config import OptimConfig, SourceKind, StageConfig
from speechllm.distributed import all_ranks
from speechllm.model import SpeechLLM
from speechllm.sharding import gathered_trainable, local_tensor
from speechllm.simulator import bins_table


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


def inside(root, step):
    """``step`` run inside ``root``'s forward (a function of its own, as Lightning reads its code)."""
    @wraps(step)
    def run(*args, **kwargs):
        return root(step, *args, **kwargs)
    return run


def exported_trainable(directory: str) -> dict[str, torch.Tensor]:
    """A stage export's trained weights (``init_from``)."""
    path = Path(directory) / "trainable.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} not found (is the previous stage DONE?)")
    return load_file(str(path))


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf gradient: the run cannot recover by skipping."""


class SpeechLLMModule(EvaluationMixin):
    """The base of every stage kind. A kind declares what it needs here, read by the runner's
    validation pass before anything is built (see ``lightning_modules.STAGE_KINDS``)."""

    #: The source kinds the stage trains on; the first is how ``data.train`` alone is read.
    source_kinds: tuple[SourceKind, ...] = ()
    #: Stage-specific config sections it reads, besides model, data, measures, optim and trainer.
    config_sections: tuple[str, ...] = ()

    @classmethod
    def sections_read(cls, cfg: StageConfig) -> tuple[str, ...]:
        """The stage-specific sections this stage's computation depends on: its own, and ``distill``
        wherever held-out measures are set (they build their rows with its format and span lengths)."""
        measured = bool(cfg.measures.sets or cfg.measures.multiple_choice)
        return tuple(dict.fromkeys(cls.config_sections + (("distill",) if measured else ())))

    @classmethod
    def config_errors(cls, cfg: StageConfig) -> list[tuple[str, str]]:
        """``(key, problem)`` for each rule of this kind that ``cfg`` breaks (none by default)."""
        return []

    def __init__(self, cfg: StageConfig, stage_dir: str | Path | None = None):
        super().__init__()
        self.cfg = cfg
        self.stage_dir = Path(stage_dir) if stage_dir else None
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)})
        # Under FSDP every rank builds the LLM empty; configure_model shards it and fills the shards.
        self.model = SpeechLLM.build(cfg.model, empty_llm=self.sharded)
        self._step_root = None
        if cfg.init_from and not self.sharded:
            self.init_from(cfg.init_from)
        # Checkpoints hold trainable weights only; the frozen parts come from their ids on load.
        self.strict_loading = False
        self._last_step_end: float | None = None
        self._bad_steps_in_a_row = 0
        self._seeded_step, self._micro_batch = -1, 0
        self.counters = {"nonfinite_steps": 0, "truncated_to_context": 0}

    @property
    def sharded(self) -> bool:
        return self.cfg.trainer.strategy == "fsdp"

    def configure_model(self) -> None:
        """Under FSDP (Lightning calls this once the processes and the device mesh exist): shard the
        model, fill the shards from rank 0, and run every step inside the FSDP root (speechllm.sharding)."""
        if not self.sharded or self._step_root is not None:
            return
        from speechllm.sharding import rank0_weights, shard

        weights = {}
        if self.global_rank == 0:
            weights = rank0_weights(self.model)
            if self.cfg.init_from:
                exported = exported_trainable(self.cfg.init_from)
                self.model.check_trainable(exported, self.cfg.init_from)
                weights.update(exported)
        self._step_root = shard(self.model, self.device_mesh["data_parallel"], weights, self.device)
        held = sum(local_tensor(p).numel() for p in self.model.llm.parameters())
        print(f"[fsdp] rank {self.global_rank}: holds {held:,} of the LLM's {sum(p.numel() for p in self.model.llm.parameters()):,} "
              f"weights", flush=True)
        for name in ("training_step", "validation_step", "test_step"):
            setattr(self, name, inside(self._step_root, getattr(self, name)))

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The model's trained weights for its export (under FSDP gathered to rank 0: every rank calls this)."""
        return gathered_trainable(self.model) if self._step_root is not None else self.model.trainable_state_dict()

    def init_from(self, directory: str) -> None:
        """Start from a previous stage's exported trainable weights (not a resume)."""
        self.model.load_trainable(exported_trainable(directory), directory)

    def sample_generators(self, batch: dict) -> list[torch.Generator]:
        """One generator per sample, seeded by its source and draw number: a sample's random input
        (simulation noise, span plan) does not depend on batch composition, ranks or resumes."""
        source = str(batch.get("source", ""))
        return [torch.Generator().manual_seed(sample_seed(self.cfg.seed, source, s)) for s in batch["seed"]]

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

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip a step whose gradients hold NaN/inf instead of poisoning the weights.

        Under DDP gradients are already all-reduced here, so every rank takes the same decision without
        an extra collective; under FSDP each holds a shard and one all-reduce of the verdict decides.
        Dropping the gradients (``grad = None``) makes AdamW leave each parameter, its moments and its
        step count untouched; the step still counts, so the data position and the LR schedule stay
        functions of the step.
        """
        grads = [local_tensor(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if self.sharded:  # each rank holds a shard of the gradients: decide together
            finite = all_ranks(finite)
        if finite:
            self._bad_steps_in_a_row = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.counters["nonfinite_steps"] += 1
        self._bad_steps_in_a_row += 1
        self.log("skipped/nonfinite_steps", float(self.counters["nonfinite_steps"]), rank_zero_only=True)
        limit = self.cfg.trainer.max_nonfinite_steps
        if self._bad_steps_in_a_row > limit:
            raise NonFiniteLossError(
                f"{self._bad_steps_in_a_row} steps in a row had NaN/inf gradients (step {self.global_step}); "
                f"the last good checkpoint is intact. Lower optim.lr or check the data (trainer.max_nonfinite_steps={limit})")

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
        checkpoint["counters"] = dict(self.counters)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.counters.update(checkpoint.get("counters", {}))

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Seed this micro-batch's randomness (dropout in LoRA or a trained LLM) from the step, the
        micro-batch within it and the rank: a resumed run draws exactly what an uninterrupted one drew,
        whatever consumed random numbers in between (a data loader starting, a validation)."""
        if self._seeded_step != self.global_step:
            self._seeded_step, self._micro_batch = self.global_step, 0
        key = (self.cfg.seed * 1_000_003 + self.global_step) * 64 + self._micro_batch
        torch.manual_seed(key * 4096 + self.global_rank)
        self._micro_batch += 1

    # ------------------------------------------------------------------ logging helpers

    def on_train_start(self) -> None:
        datamodule = self.trainer.datamodule
        for key, n in sorted(getattr(datamodule, "skipped", {}).items()):
            self.log(f"skipped/{key}", float(n), rank_zero_only=True)
        if getattr(self.model.encoder, "simulator", None) is not None and self.global_rank == 0:
            self.log_simulator_report(Path(self.cfg.model.encoder.cps.simulator))

    def log_simulator_report(self, folder: Path) -> None:
        """The learned simulator this run reads: its requested vs achieved WER and posteriorgram figure."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        if (folder / "report.json").is_file():
            bins = json.loads((folder / "report.json").read_text())["bins"]
            experiment.add_text("simulator/requested_vs_achieved", bins_table(bins), self.global_step)
        if (folder / "posteriorgram.png").is_file():
            from matplotlib.image import imread

            experiment.add_image("simulator/posteriorgram", imread(folder / "posteriorgram.png")[..., :3],
                                 self.global_step, dataformats="HWC")

    def finish_step(self, out: dict, batch: dict) -> torch.Tensor:
        """Log the step and return its loss, always connected to the projector.

        The LLM (and any LoRA on it) is in every step's graph, the projector not always: a batch whose
        rows hold no speech vector (plain text, an interleaving with no speech span) leaves it out, so
        backward would fail with a frozen LLM and DDP ranks would disagree on the parameters used. The
        projector's output on one zero input, weighted zero, keeps every step the same shape; loss and
        gradients are unchanged. It is a call of the projector, not a sum of its weights, so that under
        FSDP the weights are gathered as for any other use.
        """
        self.log_step(out, batch)
        projector = self.model.projector
        frames = projector.stack
        zero, _ = projector(out["loss"].new_zeros(1, frames, self.model.encoder.output_dim),
                            torch.tensor([frames], device=out["loss"].device))
        return out["loss"] + zero.sum() * 0.0

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's scalars (every ``trainer.log_every_n_steps``):
        on other steps a ``self.log`` is thrown away, at ~3 ms of Lightning's bookkeeping per call."""
        return self.trainer._logger_connector.should_update_logs

    def log_step(self, out: dict, batch: dict) -> None:
        """Loss terms, throughput (samples/s, LLM tokens/s), padding, augmented clips, the data mixture
        and truncations of a step.

        Only on the steps whose scalars Lightning writes (:meth:`logs_this_step`; the progress bar shows
        the loss of the last of them).
        """
        now, last = time.perf_counter(), self._last_step_end
        self._last_step_end = now
        if out.get("truncated"):
            self.counters["truncated_to_context"] += out["truncated"]
        if not self.logs_this_step():
            return
        batch_size = len(batch["id"])
        for key in ("loss", "ce", "kl"):
            if key in out:
                self.log(f"train/{key}", out[key].detach(), prog_bar=key == "loss", batch_size=batch_size)
        lengths = out["row_lengths"]
        tokens, longest = sum(lengths), max(lengths)
        if last is not None:
            dt = max(now - last, 1e-9)
            self.log("train/samples_per_s", batch_size / dt, batch_size=batch_size)
            self.log("train/llm_tokens_per_s", tokens / dt, batch_size=batch_size)
        self.log("train/seq_len", float(longest), batch_size=batch_size)
        # The share of the LLM's positions spent on padding (none when rows are packed: model.pack_sequences).
        padded = 0.0 if self.model.cfg.pack_sequences else 1.0 - tokens / (len(lengths) * longest)
        self.log("train/padding_share", padded, batch_size=batch_size)
        if "augmented" in batch:  # a batch of a source with data.augment on: how many of its clips were
            self.log("train/augmented_clips", float(sum(batch["augmented"])), batch_size=batch_size)
        if self.counters["truncated_to_context"]:
            self.log("skipped/truncated_to_context", float(self.counters["truncated_to_context"]), rank_zero_only=True)
        datamodule = self.trainer.datamodule
        if datamodule is not None and len(datamodule.source_configs()) > 1:
            shares = datamodule.shares(self.global_step)
            total = sum(v for v in shares.values() if v > 0) or 1.0
            for name, value in shares.items():
                self.log(f"curriculum/share/{name}", max(value, 0.0) / total, batch_size=batch_size)
