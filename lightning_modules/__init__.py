"""One LightningModule per stage kind. ``STAGE_KINDS`` is the registry: a new kind is its module, one
line here and its preset in ``configs/stage/`` (the module declares its source kinds, config sections
and rules; see ``SpeechLLMModule``)."""

from lightning_modules.alignment import AlignModule
from lightning_modules.asr import CurriculumASRModule
from lightning_modules.base import SpeechLLMModule
from lightning_modules.distillation import DistillModule
from lightning_modules.selection import SelectModule

STAGE_KINDS: dict[str, type[SpeechLLMModule]] = {
    "align": AlignModule,
    "asr": CurriculumASRModule,
    "distill": DistillModule,
    "select": SelectModule,
}

__all__ = ["STAGE_KINDS", "AlignModule", "CurriculumASRModule", "DistillModule", "SelectModule", "SpeechLLMModule"]
