"""A stage's run directory: its files, whether a resolved config may continue it, and moving it aside.

``runs/<pipeline>/<stage>/`` holds ``config.yaml`` (resolved, with the project version that wrote it),
``checkpoints/last.ckpt``, ``model/``, ``metrics.json``, ``progress.json``, ``initial_metrics.json``,
TensorBoard logs under ``tb/`` and ``DONE``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from speechllm.config import StageConfig, schema_default, to_yaml
from speechllm.io import atomic_write

# Changing these does not change what a stage computes (only how: packed rows and the loss kernels give
# the same loss within rounding), so a resume may change them.
RESUME_SAFE_KEYS = ("trainer.num_threads", "data.num_workers", "trainer.log_every_n_steps",
                    "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy",
                    "model.pack_sequences", "model.loss_kernel", "model.loss_chunk_size")


def project_version() -> str:
    try:
        return version("speechllm-cheap")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@dataclass
class StageDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def last_ckpt(self) -> Path:
        return self.root / "checkpoints" / "last.ckpt"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def initial_metrics(self) -> Path:
        return self.root / "initial_metrics.json"

    def write_config(self, cfg: StageConfig) -> None:
        header = f"# written by speechllm-cheap {project_version()} on {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        atomic_write(self.config, header + to_yaml(cfg))

    def move_aside(self) -> Path:
        """Rename the directory to ``<stage>.replaced-<time>`` (never delete a user's run) and return it."""
        target = self.root.with_name(f"{self.root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{self.root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        self.root.rename(target)
        return target


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(old_yaml: str, new_cfg: StageConfig, unread_sections: tuple[str, ...] = ()) -> list[str]:
    """The keys whose change alters what the stage computes, as ``key: old -> new``.

    Compared: keys in both configs, and keys new to the schema whose value is not the schema default
    (a field added by a later version of the project, left at its default, continues an old run; a
    field since removed is ignored). Not compared: ``RESUME_SAFE_KEYS``, and ``unread_sections`` (the
    config sections the stage kind does not read).
    """
    old = _flatten(OmegaConf.to_container(OmegaConf.create(old_yaml), resolve=True))
    new = _flatten(OmegaConf.to_container(new_cfg, resolve=True, enum_to_str=True))
    unread = tuple(f"{s}." for s in unread_sections)
    changed = []
    for key in sorted(new):
        if key.startswith(RESUME_SAFE_KEYS) or key.startswith(unread):
            continue
        if key in old:
            if old[key] != new[key]:
                changed.append(f"{key}: {old[key]!r} -> {new[key]!r}")
        elif new[key] != schema_default(key):  # new to this run, and not at its default
            changed.append(f"{key}: (not in the run's config) -> {new[key]!r}")
    return changed
