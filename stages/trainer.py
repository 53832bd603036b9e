"""The Lightning trainer of a stage: precision, strategy (DDP/FSDP with a bounded collective timeout),
checkpointing, logging and callbacks."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from speechllm.config import StageConfig
from speechllm.sharding import gathered_trainable
from stages.callbacks import LastValidation, StepLogsSurviveKill, StepTimer
from stages.checkpoint_io import AtomicCheckpointIO


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), where a bf16 autocast pays off
    (1.37x per stage-1 step on the 2-core machine, `bench levers`); without them it is emulated and slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: stay in float32
            return False
    return any(flag in ("avx512_bf16", "amx_bf16") for flag in cpuinfo.split())


def resolve_precision(name: str, accelerator: str = "auto", cpuinfo: str | None = None) -> str:
    """``auto``: bf16-mixed on a bf16 GPU, or on a CPU with bf16 instructions; float32 otherwise."""
    if name != "auto":
        return name
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if accelerator in ("auto", "cpu") and cpu_has_native_bf16(cpuinfo) else "32-true"


def is_rank_zero() -> bool:
    """Whether this process is the job's first (from the launcher's environment: Lightning, torchrun,
    SLURM): only it writes run-directory state."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return (_get_rank() or 0) == 0 and os.environ.get("NODE_RANK", "0") == "0"


def build_strategy(cfg: StageConfig):
    """DDP (default for several devices) or FSDP, with a bounded collective timeout: a rank that dies
    ends the others within ``trainer.collective_timeout_s`` instead of hanging them."""
    t = cfg.trainer
    devices = t.devices if isinstance(t.devices, int) else (torch.cuda.device_count() if t.devices in ("auto", -1) else len(t.devices))
    several = (devices or 1) > 1 or t.num_nodes > 1
    timeout = timedelta(seconds=t.collective_timeout_s)
    if t.strategy == "ddp" or (t.strategy == "auto" and several):
        from lightning.pytorch.strategies import DDPStrategy

        # Every parameter is in every step's graph (finish_step ties the projector in), so DDP needs no
        # search for unused ones.
        return DDPStrategy(timeout=timeout)
    if t.strategy == "fsdp":
        return TrainedWeightsFSDP(data_parallel_size=(devices or 1) * t.num_nodes, tensor_parallel_size=1,
                                  save_distributed_checkpoint=False, timeout=timeout)
    return t.strategy


class TrainedWeightsFSDP(ModelParallelStrategy):
    """FSDP2 over every process (the module shards itself in configure_model: speechllm.sharding), on
    GPUs and on CPUs (gloo) alike. Checkpoints are consolidated: rank 0 writes one file of the trained
    weights and the full optimizer state, which any number of ranks can resume; the frozen weights,
    which come from their ids on load, are never gathered for it."""

    def lightning_module_state_dict(self) -> dict:
        return gathered_trainable(self.model)


def build_trainer(cfg: StageConfig, root: Path, progress: Path) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    # The frozen encoder and LLM stay in eval mode on purpose (no dropout, a valid prefix cache):
    # Lightning's warning about it would greet every run.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    t = cfg.trainer
    checkpoint = ModelCheckpoint(
        dirpath=root / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps, save_last=True,
        save_top_k=t.keep_last_checkpoints, monitor="step", mode="max",
    )
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(cfg),
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val or None,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0,
        # The data module shards every loader itself (resumable batch streams, padded eval sets).
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(root), name="tb", version=""),
        # The bar moves when the logged loss does: redrawn every step (Rich's default, with its own
        # thread), it cost 3 % of a 0.1 s CPU step (`bench overhead`).
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), StepTimer(), LastValidation(),
                   StepLogsSurviveKill(),
                   TQDMProgressBar(refresh_rate=t.log_every_n_steps)],
        plugins=[AtomicCheckpointIO(progress, t.max_steps)], default_root_dir=str(root), enable_model_summary=False,
    )
