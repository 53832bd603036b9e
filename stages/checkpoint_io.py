"""Lightning checkpoint I/O that never leaves a broken ``last.ckpt``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from speechllm.io import atomic_open, atomic_write


class _WriteErrors:
    """A binary file that remembers the OSError of a failed write, which torch.save would hide."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write through a temporary file, fsync, rename: a kill or power cut while saving never breaks
    ``last.ckpt``; a full disk raises a clear error and leaves the previous one intact.

    After each complete ``last.ckpt`` it records the step in ``progress.json`` (so ``status`` needs no
    checkpoint loading, and a step there always has its checkpoint on disk).
    """

    def __init__(self, progress: Path | None = None, max_steps: int | None = None):
        super().__init__()
        self.progress, self.max_steps = progress, max_steps

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        try:
            with atomic_open(path, "wb") as f:
                writer = _WriteErrors(f)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError as err:
                    # torch's zip writer turns a failed write into "unexpected pos ...": the OSError behind it
                    raise (writer.error or err) from err
        except OSError as err:  # a full disk, a quota, a file-size limit
            last = path.with_name("last.ckpt")
            previous = "the previous last.ckpt is intact" if last.exists() else "no last.ckpt was written yet"
            raise OSError(err.errno, f"could not write checkpoint {path} ({err.strerror or err}); {previous}") from err
        if self.progress is not None and path.name == "last.ckpt":
            atomic_write(self.progress, json.dumps({"step": checkpoint["global_step"], "max_steps": self.max_steps,
                                                    "time": time.time()}))
