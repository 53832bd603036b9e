"""Lightning callbacks of every stage: step timing, the last validation's metrics, and TensorBoard curves
that survive a SIGKILL."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class StepTimer(L.Callback):
    """Mean wall time of a training step (validation excluded) in this process."""

    def __init__(self):
        self.total, self.count, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.total += time.perf_counter() - self._start
        self.count += 1

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


class LastValidation(L.Callback):
    """The step and ``val/`` metrics of the last validation inside ``fit`` in this process.

    When that validation ran at the final step, the runner takes its metrics instead of validating the
    same weights again (at the demo scale, half a minute per stage)."""

    def __init__(self):
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.step = trainer.global_step
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


class StepLogsSurviveKill(L.Callback):
    """Keep TensorBoard curves whole across a SIGKILL and resume.

    Lightning writes a step's ``self.log`` metrics after that step's checkpoint, so a kill in between
    would leave the step missing forever (the resumed run starts after it). The checkpoint carries
    those metrics and the resumed run logs them again; TensorBoard keeps the later copy of a step.
    It reads Lightning's own step bookkeeping (private attributes, no public equivalent): a Lightning
    upgrade that moves them fails ``test_sigkill_then_rerun_resumes_exactly``.
    """

    def __init__(self):
        self.pending: dict[str, Any] | None = None

    def on_train_batch_start(self, *args) -> None:
        self.pending = None

    def on_train_batch_end(self, trainer, *args) -> None:
        # Runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last).
        connector = trainer._logger_connector
        if trainer.fit_loop._should_accumulate() or not connector.should_update_logs or not trainer.loggers:
            return
        metrics = {k: float(v) for k, v in connector.metrics["log"].items()}
        self.pending = {"step": trainer.fit_loop.epoch_loop._batches_that_stepped,
                        "metrics": {**metrics, "epoch": trainer.current_epoch}}

    def on_validation_start(self, *args) -> None:
        self.pending = None  # validation runs after the step's metrics were logged

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict.get("pending")

    def on_train_start(self, trainer, *args) -> None:
        if self.pending:
            for logger in trainer.loggers:
                logger.log_metrics(self.pending["metrics"], step=self.pending["step"])
                logger.save()
        self.pending = None
