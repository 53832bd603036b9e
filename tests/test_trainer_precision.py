"""``trainer.precision: auto`` on a GPU machine, with CUDA's answers set by monkeypatch (the CPU
branch is in test_trainer.py): bf16 GPUs get bf16-mixed, others float32, and the GPU is asked about
only when the run is on it."""

import pytest
import torch

from stages.trainer import resolve_precision

NO_BF16_CPU = "flags\t\t: fpu sse sse2 avx avx2 avx512f\n"
BF16_CPU = NO_BF16_CPU.rstrip("\n") + " avx512_bf16\n"


@pytest.fixture
def gpu(monkeypatch):
    """A visible CUDA device whose bf16 support the test sets; records whether it was asked."""
    state = {"bf16": True, "asked": 0}

    def bf16_supported(*args, **kwargs) -> bool:
        state["asked"] += 1
        return state["bf16"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    return state


@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda"])
def test_auto_on_a_gpu_follows_its_bf16_support_not_the_cpu(gpu, accelerator):
    gpu["bf16"] = True
    assert resolve_precision("auto", accelerator, NO_BF16_CPU) == "bf16-mixed"
    gpu["bf16"] = False  # e.g. a V100 or T4: float32, even on a CPU with bf16 instructions
    assert resolve_precision("auto", accelerator, BF16_CPU) == "32-true"
    assert gpu["asked"] == 2


def test_a_cpu_run_on_a_gpu_machine_follows_the_cpu(gpu):
    assert resolve_precision("auto", "cpu", BF16_CPU) == "bf16-mixed"
    assert resolve_precision("auto", "cpu", NO_BF16_CPU) == "32-true"
    assert gpu["asked"] == 0  # the GPU's bf16 support plays no part


def test_explicit_precisions_are_kept_on_a_gpu(gpu):
    gpu["bf16"] = False
    for name in ("32-true", "bf16-mixed", "16-mixed"):
        assert resolve_precision(name, "gpu", NO_BF16_CPU) == name


def test_without_cuda_a_gpu_accelerator_stays_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "gpu", BF16_CPU) == "32-true"  # the CPU's bf16 is not the GPU's
    assert resolve_precision("auto", "auto", BF16_CPU) == "bf16-mixed"
