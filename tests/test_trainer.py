"""Trainer settings that need no training run: precision from the CPU flags."""

import torch

from stages.trainer import cpu_has_native_bf16, resolve_precision

# Abridged /proc/cpuinfo "flags" lines of three real CPU generations.
SKYLAKE = "flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl\n"
COOPER_LAKE = SKYLAKE.rstrip("\n") + " avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = SKYLAKE.rstrip("\n") + " amx_bf16 amx_tile amx_int8\n"


def test_bf16_instructions_are_read_from_the_cpu_flags():
    assert not cpu_has_native_bf16(SKYLAKE)
    assert cpu_has_native_bf16(COOPER_LAKE)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_has_native_bf16("flags : avx512_bf16x\n")  # a whole flag, not a prefix


def test_auto_precision_on_a_cpu_follows_its_bf16_instructions():
    assert resolve_precision("auto", "cpu", SKYLAKE) == "32-true"
    assert resolve_precision("auto", "cpu", COOPER_LAKE) == "bf16-mixed"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto", SAPPHIRE_RAPIDS) == "bf16-mixed"
        assert resolve_precision("auto", "auto", SKYLAKE) == "32-true"


def test_an_explicit_precision_is_kept():
    for name in ("32-true", "bf16-mixed", "16-mixed"):
        assert resolve_precision(name, "cpu", COOPER_LAKE) == name
