"""One LightningModule per stage; ``STAGE_MODULES`` maps a stage ``kind`` to its module."""

from lightning_modules.alignment import AlignModule

STAGE_MODULES = {"align": AlignModule}

__all__ = ["STAGE_MODULES", "AlignModule"]
