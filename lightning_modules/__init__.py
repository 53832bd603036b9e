"""One LightningModule per stage; ``STAGE_MODULES`` maps a stage ``kind`` to its module."""

from lightning_modules.alignment import AlignModule
from lightning_modules.asr import CurriculumASRModule
from lightning_modules.distillation import DistillModule
from lightning_modules.selection import SelectModule

STAGE_MODULES = {"align": AlignModule, "asr": CurriculumASRModule, "distill": DistillModule, "select": SelectModule}

__all__ = ["STAGE_MODULES", "AlignModule", "CurriculumASRModule", "DistillModule", "SelectModule"]
