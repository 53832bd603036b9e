"""Stage 4's second probe: after training, M(c) is measured again on the same probes, and the selection
report gains ``M_after`` per cluster and the mean M before/after over the targeted clusters and the others.

The stage runs once on the tiny pipeline (4 steps, select only); the tests then check the report, the
figure and scalars in TensorBoard, the report's printed lines, that a second probe of one model gives
the same M, and that a run resumed at its last step (which trains nothing and so skips
``on_train_end``) measures the same ``M_after`` again."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechllm.active_selection import (
    after_summary,
    cluster_misalignment,
    cluster_pool,
    load_pool,
    probe_set,
    report_markdown,
    with_after,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = ("init_from=null", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
             "trainer.checkpoint_every_n_steps=2", "trainer.evaluate_before_training=false")


def tiny_pipeline(tmp_path: Path, data: Path) -> Path:
    text = (REPO / "configs/pipeline/tiny.yaml").read_text().replace("data/tiny/", f"{data}/")
    text = text.replace("../model/", f"{REPO}/configs/model/").replace("../stage/", f"{REPO}/configs/stage/")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def run_select(pipeline: Path, run_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "stages", "run", str(pipeline), "--run-dir", str(run_dir), "trainer.num_threads=1",
               "--only", "select", *OVERRIDES]
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def select_run(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    """(pipeline file, the select stage's directory) after one 4-step run."""
    root = tmp_path_factory.mktemp("select_after")
    pipeline = tiny_pipeline(root, tiny_data)
    run_select(pipeline, root / "run")
    return pipeline, root / "run" / "tiny" / "select"


def test_every_cluster_has_m_after_and_the_summary_matches(select_run):
    _, stage = select_run
    report = json.loads((stage / "selection/report.json").read_text())
    clusters = report["clusters"]
    assert len(clusters) == report["clusters_k"] == 4
    assert report["M_after_step"] == STEPS
    for c in clusters:
        assert isinstance(c["M_after"], float) and math.isfinite(c["M_after"]) and c["M_after"] >= 0
    # the second probe read the same probes with the same spans: the same positions, other values
    before = json.loads((stage / "selection/misalignment.json").read_text())
    after = json.loads((stage / "selection/misalignment_after.json").read_text())
    assert after["positions"] == before["positions"] and set(after["items"]) == set(before["items"])
    assert after["step"] == STEPS
    assert [c["M_after"] for c in sorted(clusters, key=lambda c: c["cluster"])] == after["M"]
    assert any(c["M_after"] != c["M"] for c in clusters), "training moved no cluster's M"
    # targeted = more than the uniform share of what was spent (texts here: selected > P_web * 6)
    total = sum(c["selected"] for c in clusters)
    assert total == report["selected"] == 6
    targeted = {c["cluster"] for c in clusters if c["selected"] > c["p_web"] * total}
    assert targeted and {c["cluster"] for c in clusters if c["targeted"]} == targeted
    summary = report["M_after_summary"]
    for group, members in (("targeted", [c for c in clusters if c["cluster"] in targeted]),
                           ("others", [c for c in clusters if c["cluster"] not in targeted]), ("all", clusters)):
        assert summary[group]["clusters"] == len(members)
        assert summary[group]["M"] == pytest.approx(sum(c["M"] for c in members) / len(members), abs=1e-12)
        assert summary[group]["M_after"] == pytest.approx(sum(c["M_after"] for c in members) / len(members), abs=1e-12)
    markdown = (stage / "selection/report.md").read_text()
    assert "| M after |" in markdown and f"targeted ({len(targeted)} clusters)" in markdown


def test_tensorboard_figure_before_and_after_and_the_means(select_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, stage = select_run
    acc = EventAccumulator(str(stage / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    # the figure at the start (M before) and at the end (before and after, selected counts)
    assert [e.step for e in acc.Images("selection/misalignment_and_selection")] == [0, STEPS]
    report = json.loads((stage / "selection/report.json").read_text())
    for group in ("targeted", "others"):
        for when, key in (("before", "M"), ("after", "M_after")):
            (event,) = acc.Scalars(f"selection/M_{group}/{when}")
            assert event.step == STEPS and event.value == pytest.approx(report["M_after_summary"][group][key], rel=1e-6)


def test_the_report_prints_m_after_in_its_selection_lines(select_run):
    from stages.report import format_report

    _, stage = select_run
    sel = json.loads((stage / "selection/report.json").read_text())
    text = format_report({"pipeline": "tiny", "scale": None, "baselines": {}, "stages": {}, "selection": {"select": sel}})
    first = sel["clusters"][0]
    assert f"cluster {first['cluster']:>3}  M {first['M']:.4f} -> {first['M_after']:.4f} after  P_web" in text
    for group, label in (("targeted", "targeted"), ("others", "other")):
        g = sel["M_after_summary"][group]
        assert (f"mean M of {label} clusters ({g['clusters']}): {g['M']:.4f} -> {g['M_after']:.4f} "
                f"after training ({g['change']:+.4f})") in text
    # a report from before this change (no M_after) still prints
    old = {**sel, "clusters": [{k: v for k, v in c.items() if k != "M_after"} for c in sel["clusters"]]}
    old.pop("M_after_summary")
    plain = format_report({"pipeline": "tiny", "scale": None, "baselines": {}, "stages": {}, "selection": {"select": old}})
    assert f"M {first['M']:.4f}  P_web" in plain and "after" not in plain


def test_probing_one_model_twice_gives_the_same_m(select_run, tmp_path):
    from lightning_modules.base import exported_trainable
    from speechllm.model import SpeechLLM
    from stages.runner import resolve_stage_configs

    pipeline, stage = select_run
    cfg = next(c for name, _, c in resolve_stage_configs(pipeline, list(OVERRIDES), str(stage.parents[1]))
               if name == "select")
    out = tmp_path / "selection"
    shutil.copytree(stage / "selection", out)  # its clusters and synthesised probes: read, not redone
    ids, texts, _, pool_key = load_pool(cfg)
    torch.manual_seed(0)
    model = SpeechLLM.build(cfg.model)
    model.load_trainable(exported_trainable(str(stage / "model")), str(stage / "model"))
    model.train()  # the probe puts it in eval mode (no dropout) and back
    runs = []
    for _ in range(2):
        torch.rand(100)  # global randomness consumed in between does not matter
        probes = probe_set(cfg, out, ids, texts, cluster_pool(texts, cfg, out, pool_key))
        runs.append(cluster_misalignment(model, cfg, probes))
        assert model.training
    assert runs[0] == runs[1]
    assert max(runs[0]["M"]) > 0
    # and it is what the stage measured after training (the exported model is the trained one; this
    # process runs 2 threads, the stage 1, so sums may round differently)
    assert runs[0]["M"] == pytest.approx(json.loads((out / "misalignment_after.json").read_text())["M"], rel=1e-4,
                                         abs=1e-9)


def test_a_run_resumed_at_its_last_step_measures_m_after_again(select_run, tmp_path):
    pipeline, stage = select_run
    first = json.loads((stage / "selection/report.json").read_text())
    copy = tmp_path / "run" / "tiny" / "select"
    shutil.copytree(stage, copy)
    (copy / "DONE").unlink()  # killed after its last checkpoint, before the export
    (copy / "selection/misalignment_after.json").unlink()
    proc = run_select(pipeline, tmp_path / "run")
    assert "resuming" in proc.stdout
    again = json.loads((copy / "selection/report.json").read_text())
    assert again["M_after_step"] == STEPS
    assert {c["cluster"]: c["M_after"] for c in again["clusters"]} == pytest.approx(
        {c["cluster"]: c["M_after"] for c in first["clusters"]}, rel=1e-6, abs=1e-9)


def test_after_summary_by_hand():
    clusters = [{"cluster": 0, "M": 0.4, "M_after": 0.1, "targeted": True},
                {"cluster": 1, "M": 0.2, "M_after": 0.3, "targeted": True},
                {"cluster": 2, "M": 0.1, "M_after": 0.1, "targeted": False}]
    summary = after_summary(clusters)
    assert summary["targeted"]["clusters"] == 2
    assert summary["targeted"]["M"] == pytest.approx(0.3) and summary["targeted"]["M_after"] == pytest.approx(0.2)
    assert summary["targeted"]["change"] == pytest.approx(-0.1)
    assert summary["others"] == {"clusters": 1, "M": 0.1, "M_after": 0.1, "change": 0.0}
    assert summary["all"]["M"] == pytest.approx(0.7 / 3)
    empty = after_summary([{**c, "targeted": False} for c in clusters])["targeted"]
    assert empty == {"clusters": 0, "M": None, "M_after": None, "change": None}
    report = {"gamma": 5.0, "clusters_k": 3, "selected": 2, "budget": 2.0, "budget_unit": "texts",
              "selected_topics": {"a": 2},
              "clusters": [{**c, "p_web": 1 / 3, "p_target": 1 / 3, "selected": 1, "topics": [], "examples": ["x"]}
                           for c in clusters]}
    updated = with_after({**report, "clusters": [{k: v for k, v in c.items() if k != "M_after"}
                                                 for c in report["clusters"]]}, [0.1, 0.3, 0.1], step=7)
    assert [c["M_after"] for c in updated["clusters"]] == [0.1, 0.3, 0.1] and updated["M_after_step"] == 7
    assert "- others (1 clusters): 0.1000 -> 0.1000 (change +0.0000)" in report_markdown(updated)


def test_report_counts_topics_and_sources_per_cluster_and_in_the_selection():
    from types import SimpleNamespace

    from speechllm.active_selection import selection_report

    assignment = torch.tensor([0, 0, 0, 1, 1])
    labels = {"topic": ["art", "art", "law", "news", "news"],
              "source": ["fortunes", "fortunes", "wordnet", "gensim-news", "gensim-news"]}
    sel = SimpleNamespace(gamma=5.0, budget_unit="texts")
    report = selection_report(2, torch.tensor([0.6, 0.4]), torch.tensor([0.1, 0.5]), torch.tensor([0.2, 0.8]),
                              assignment, [2, 3, 4], ["t"] * 5, labels, 3.0, [1.0] * 5, sel)
    by_cluster = {c["cluster"]: c for c in report["clusters"]}
    assert by_cluster[0]["sources"] == [{"source": "fortunes", "share": 0.667}, {"source": "wordnet", "share": 0.333}]
    assert by_cluster[0]["topics"] == [{"topic": "art", "share": 0.667}, {"topic": "law", "share": 0.333}]
    assert by_cluster[1]["sources"] == [{"source": "gensim-news", "share": 1.0}]
    assert report["selected_sources"] == {"gensim-news": 2, "wordnet": 1}
    assert report["selected_topics"] == {"news": 2, "law": 1}
    assert [c["cluster"] for c in report["clusters"]] == [1, 0]  # by M
    assert by_cluster[1]["targeted"] and not by_cluster[0]["targeted"]  # 2 of 3 texts vs P_web 0.4
    text = report_markdown(report)
    assert "gensim-news 100%" in text and "Selected sources: gensim-news 2, wordnet 1" in text


def test_heldout_documents_get_their_nearest_cluster_and_each_evaluation_keeps_its_rows(select_run):
    from lightning_modules.evaluation import read_eval_rows, summarise
    from speechllm.manifest import load_manifest

    pipeline, stage = select_run
    report = json.loads((stage / "selection/report.json").read_text())
    nearest = json.loads((stage / "selection/heldout_clusters.json").read_text())["sets"]
    assert set(nearest) == {"heldout"}  # tiny.yaml's select measures
    docs = load_manifest(_tiny_set(pipeline))
    assert set(nearest["heldout"]) == {d.id for d in docs}
    assert set(nearest["heldout"].values()) <= set(range(report["clusters_k"]))
    # the final validation's rows are kept, and summarising them gives the logged metrics
    steps = read_eval_rows(stage, "val", "heldout")
    assert STEPS in steps
    rows = steps[STEPS]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert summarise("measure", rows)["M"] == pytest.approx(metrics["val/heldout/M"], rel=1e-5)
    assert len({r["id"] for r in rows}) == len(rows) and {r["id"] for r in rows} <= set(nearest["heldout"])


def _tiny_set(pipeline: Path) -> str:
    import yaml

    stages = yaml.safe_load(pipeline.read_text())["stages"]
    return next(s for s in stages if s["name"] == "select")["config"]["measures"]["sets"]["heldout"]
