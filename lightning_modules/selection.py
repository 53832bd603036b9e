"""Stage 4, ``select``: active misalignment-driven selection, then distillation (SALAD stage II).

Starts from stage 3's model (``init_from``). Before the first step, :func:`speechllm.active_selection.run_selection`
clusters the text pool, probes each cluster's misalignment with this model, draws texts from
P_target(c) ∝ P_web(c) M(c)^gamma and synthesises them; the synthetic set becomes the
``selection.source`` training source, next to natural speech and text (equal shares by default).
Training itself is stage 3's distillation step, unchanged. After the last step (``on_train_end``; or
``on_fit_end`` when a run resumed at its last step trains nothing),
:func:`speechllm.active_selection.remeasure_after` probes the same texts again with the trained model and
adds ``M_after`` per cluster to the report. TensorBoard gets the per-cluster M (before, then before and
after) with the selected counts as a figure, the selection histogram, a few synthesised clips, the
selection report and the mean M before/after over the targeted clusters and the others.
"""

from __future__ import annotations

from lightning_modules.distillation import DistillModule
from speechllm.active_selection import remeasure_after, run_selection, seconds_of


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
                                              natural_seconds=seconds, exclude_texts=natural_texts,
                                              root=self._step_root)
        self.model.train(was_training)
        self.trainer.datamodule.manifest_overrides[sel.source] = self.selection_report["manifest"]
        if self.global_rank == 0:
            self.log_selection(self.selection_report)

    def on_train_end(self) -> None:
        """M(c) again after the last step, on the same probes (every rank takes part), into the report;
        here the model is still on its device and wrapped as it trained."""
        if self.selection_report is not None:
            self.selection_report = remeasure_after(self.model, self.cfg, self.stage_dir / "selection",
                                                    self.global_step, root=self._step_root)
            if self.global_rank == 0:
                self.log_after(self.selection_report)

    def on_fit_end(self) -> None:
        """A fit resumed from its last step trains nothing and skips ``on_train_end``: measure here (the
        cached measure when the killed run got that far), with the model back on the training device
        for the probe (the strategy's teardown moved it to the CPU; FSDP leaves it in place)."""
        if self.selection_report is None or "M_after_summary" in self.selection_report:
            return
        device = self.trainer.strategy.root_device
        before = next(self.model.parameters()).device
        move = not self.sharded and before != device
        if move:
            self.to(device)
        try:
            self.on_train_end()
        finally:
            if move:
                self.to(before)

    def log_after(self, report: dict) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None:
            return
        experiment.add_figure("selection/misalignment_and_selection", selection_figure(report), self.global_step)
        for group, g in report["M_after_summary"].items():
            if g["clusters"]:
                experiment.add_scalar(f"selection/M_{group}/before", g["M"], self.global_step)
                experiment.add_scalar(f"selection/M_{group}/after", g["M_after"], self.global_step)
        from speechllm.active_selection import report_markdown

        experiment.add_text("selection/report", report_markdown(report), self.global_step)

    def log_selection(self, report: dict) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None:
            return
        import torch

        from speechllm.manifest import load_audio, load_manifest

        clusters = report["clusters"]
        experiment.add_figure("selection/misalignment_and_selection", selection_figure(report), self.global_step)
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


def selection_figure(report: dict):
    """Per cluster: M(c) before training (and after, where the report has ``M_after``) over the texts
    selected from it; targeted clusters (more than their uniform share) are marked below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = sorted(report["clusters"], key=lambda r: r["cluster"])
    ids = [r["cluster"] for r in clusters]
    after = all("M_after" in r for r in clusters)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(clusters) * 0.12), 6), sharex=True)
    width = 0.4 if after else 0.8
    axes[0].bar([c - width / 2 if after else c for c in ids], [r["M"] for r in clusters], width=width,
                label="before training")
    if after:
        axes[0].bar([c + width / 2 for c in ids], [r["M_after"] for r in clusters], width=width, color="tab:green",
                    label=f"after training (step {report.get('M_after_step', '?')})")
        axes[0].legend(loc="upper right", fontsize="small")
    axes[0].set_ylabel("misalignment M(c)")
    colors = ["tab:red" if r.get("targeted") else "tab:orange" for r in clusters]
    axes[1].bar(ids, [r["selected"] for r in clusters], color=colors)
    axes[1].set_ylabel("texts selected (red: targeted)")
    axes[1].set_xlabel("cluster")
    fig.tight_layout()
    return fig
