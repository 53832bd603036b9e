"""Stage 4, ``select``: active misalignment-driven selection, then distillation (SALAD stage II).

Starts from stage 3's model (``init_from``). Before the first step, :func:`speechllm.active_selection.run_selection`
clusters the text pool, probes each cluster's misalignment with this model, draws texts from
P_target(c) ∝ P_web(c) M(c)^gamma and synthesises them; the synthetic set becomes the
``selection.source`` training source, next to natural speech and text (equal shares by default).
Training itself is stage 3's distillation step, unchanged. TensorBoard gets the per-cluster M as a
figure, the selection histogram, a few synthesised clips and the selection report.
"""

from __future__ import annotations

from lightning_modules.distillation import DistillModule
from speechllm.active_selection import run_selection, seconds_of


class SelectModule(DistillModule):
    config_sections = ("distill", "selection")

    @classmethod
    def config_errors(cls, cfg) -> list[tuple[str, str]]:
        sel, sources = cfg.selection, list(cfg.data.sources)
        errors = super().config_errors(cfg)
        if sel.source not in sources:
            errors.append(("selection.source", f"{sel.source!r} is not one of data.sources {sources}"))
        if not sel.pool:
            errors.append(("selection.pool", "the text pool to select from is not set"))
        if sel.budget_unit == "fraction" and sel.natural not in sources:
            errors.append(("selection.natural", f"a fraction budget needs the natural source {sel.natural!r} "
                           f"in data.sources {sources}"))
        return errors

    def __init__(self, cfg, stage_dir=None):
        super().__init__(cfg, stage_dir)
        self.selection_report: dict | None = None

    def on_fit_start(self) -> None:
        if self.stage_dir is None:
            raise ValueError("the select stage needs its stage directory (run it through the stage runner)")
        sel, sources = self.cfg.selection, self.cfg.data.sources
        natural = sources.get(sel.natural)
        natural_texts = set()
        seconds = 0.0
        if natural is not None and natural.manifest:
            from speechllm.manifest import load_manifest

            natural_texts = {" ".join(u.text.split()) for u in load_manifest(natural.manifest)}
            seconds = seconds_of(natural.manifest) if sel.budget_unit == "fraction" else 0.0
        was_training = self.model.training
        self.model.eval()
        self.selection_report = run_selection(self.model, self.cfg, self.stage_dir / "selection",
                                              natural_seconds=seconds, exclude_texts=natural_texts)
        self.model.train(was_training)
        self.trainer.datamodule.manifest_overrides[sel.source] = self.selection_report["manifest"]
        if self.global_rank == 0:
            self.log_selection(self.selection_report)

    def log_selection(self, report: dict) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import torch

        from speechllm.manifest import load_audio, load_manifest

        clusters = sorted(report["clusters"], key=lambda r: r["cluster"])
        fig, axes = plt.subplots(2, 1, figsize=(max(6, len(clusters) * 0.12), 6), sharex=True)
        axes[0].bar([r["cluster"] for r in clusters], [r["M"] for r in clusters])
        axes[0].set_ylabel("misalignment M(c)")
        axes[1].bar([r["cluster"] for r in clusters], [r["selected"] for r in clusters], color="tab:orange")
        axes[1].set_ylabel("texts selected")
        axes[1].set_xlabel("cluster")
        fig.tight_layout()
        experiment.add_figure("selection/misalignment_and_selection", fig, self.global_step)
        selected = torch.tensor([r["cluster"] for r in clusters for _ in range(r["selected"])], dtype=torch.float)
        if len(selected):
            experiment.add_histogram("selection/selected_clusters", selected, self.global_step)
        from speechllm.active_selection import report_markdown

        experiment.add_text("selection/report", report_markdown(report), self.global_step)
        manifest = report["manifest"]
        for utt in load_manifest(manifest, require_audio=True)[:3]:
            rate = self.model.encoder.sample_rate
            experiment.add_audio(f"selection/samples/{utt.id}", load_audio(utt.audio, rate)[None], self.global_step,
                                 sample_rate=rate)
