"""The base of every enumerated config field: a ``str`` that OmegaConf checks against the allowed
values at merge time, so ``optim.schedule: cosin`` fails at load naming the key and the choices."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """Members are named by their values (OmegaConf matches a YAML string to a member's *name*), compare
    equal to the plain string and print as it, so code reads ``cfg.optim.schedule == "cosine"``."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]
