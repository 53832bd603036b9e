"""The report's comparison tables read each stage's final test-set value (validation only as fallback),
each with its bootstrap interval where the stage recorded one."""

from stages.report import comparisons, format_report


def test_comparisons_prefer_the_test_set_and_line_up_the_runs():
    def stage(test_wer=None, val_wer=None, **extra):
        m = {"steps": 10, **extra}
        if val_wer is not None:
            m["val/heldout_dev/wer"] = val_wer
        if test_wer is not None:
            m["test/heldout/wer"] = test_wer
        return m

    report = {"stages": {
        "align": stage(test_wer=0.6, **{"initial/test/heldout/wer": 1.7}),
        "asr": stage(test_wer=0.54, val_wer=0.57),
        "asr_scratch": stage(val_wer=0.7),  # no test set: validation is the fallback
        "distill": {"val/docs/M": 0.35, "val/docs/M_low": 0.3, "val/docs/M_high": 0.4, "val/docs/F": 0.02,
                    "val/broad/M": 0.5},
        "distill_nll": {"val/docs/M": 0.33, "val/docs/F": 0.19, "val/broad/M": 0.6},
        "distill_half": {"state": "not finished"},
    }}
    lines = comparisons(report)
    assert [line.split()[-1] for line in lines[1:4]] == ["0.600", "0.700", "0.540"]
    assert lines[5].split() == ["set", "distill_nll", "distill"]  # alpha 0 first; the unfinished run left out
    m_row = next(line for line in lines if line.split()[:2] == ["docs", "M"])
    f_row = next(line for line in lines if line.split()[:2] == ["docs", "F"])
    assert m_row.split()[2:] == ["0.330", "0.350", "[0.300,", "0.400]"] and f_row.split()[2:] == ["0.190", "0.020"]
    broad = [line.split() for line in lines if line.split()[0] == "broad"]
    assert broad == [["broad", "M", "0.600", "0.500"]]  # one row per set and metric that was measured
    assert not any("stage 4" in line for line in lines)  # select_uniform did not run


def test_a_stages_lines_show_each_interval():
    metrics = {"steps": 10, "kind": "distill", "initial/val/docs/M": 0.35, "initial/val/docs/M_low": 0.33,
               "initial/val/docs/M_high": 0.37, "val/docs/M": 0.287, "val/docs/M_low": 0.27, "val/docs/M_high": 0.305,
               "val/docs/M_positions": 900}
    text = format_report({"pipeline": "p", "scale": None, "baselines": {}, "stages": {"distill": metrics}})
    assert "M                          0.350 [0.330, 0.370] -> 0.287 [0.270, 0.305]" in text
    assert "M_low" not in text and "positions" not in text


def _rows(path, rows):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _doc(i, m, f=0.0):
    return {"id": f"d{i}", "m_sum": m, "m_count": 1.0, "f_sum": f, "f_count": 1.0}


def test_heldout_m_where_selection_aimed_and_along_training(tmp_path):
    import json
    from types import SimpleNamespace

    from stages.report import analyses, measures_along_training, targeted_heldout

    distill, select, uniform = tmp_path / "distill", tmp_path / "select", tmp_path / "select_uniform"
    # documents d0-d3 nearest clusters 0, 0, 1, 2; active selection aimed at cluster 0, uniform at cluster 2
    for root in (select, uniform):
        _rows(root / "selection" / "heldout_clusters.json", [{"key": "k", "sets": {"broad": {
            "d0": 0, "d1": 0, "d2": 1, "d3": 2}}}])
    _rows(distill / "eval/val/broad/step-0.jsonl", [_doc(i, 0.9) for i in range(4)])
    _rows(distill / "eval/val/broad/step-5.jsonl", [_doc(i, 0.8) for i in range(4)])
    _rows(distill / "eval/val/broad/step-10.jsonl", [_doc(0, 0.6), _doc(1, 0.4), _doc(2, 0.5), _doc(3, 0.5)])
    _rows(select / "eval/val/broad/step-8.jsonl", [_doc(0, 0.2), _doc(1, 0.2), _doc(2, 0.5), _doc(3, 0.4)])
    _rows(uniform / "eval/val/broad/step-8.jsonl", [_doc(0, 0.5), _doc(1, 0.3), _doc(2, 0.5), _doc(3, 0.3)])

    def cfg(init_from=None):
        return SimpleNamespace(init_from=init_from, measures=SimpleNamespace(sets={"broad": "x.jsonl"}))

    stages = [(name, SimpleNamespace(root=root), cfg(str(distill / "model") if name != "distill" else None))
              for name, root in (("distill", distill), ("select", select), ("select_uniform", uniform))]
    sel = lambda targeted: {"clusters_k": 3, "clusters": [{"cluster": c, "targeted": c == targeted} for c in range(3)]}  # noqa: E731
    out = targeted_heldout(stages, {"select": sel(0), "select_uniform": sel(2)})
    own = out["select"]["select"]["broad"]
    assert own["targeted"]["clusters"] == 1 and own["targeted"]["documents"] == 2
    assert own["targeted"]["before"]["M"] == 0.5 and own["targeted"]["after"]["M"] == 0.2  # d0, d1: (0.6+0.4)/2
    assert own["others"]["before"]["M"] == 0.5 and own["others"]["after"]["M"] == 0.45
    assert own["targeted"]["after"]["M_low"] <= 0.2 <= own["targeted"]["after"]["M_high"]
    # uniform read on the clusters active selection aimed at
    assert out["select_uniform"]["select"]["broad"]["targeted"]["after"]["M"] == 0.4
    assert out["select_uniform"]["select_uniform"]["broad"]["targeted"]["documents"] == 1
    assert "distill" not in out  # no selection

    along = measures_along_training(distill, cfg())
    assert [(p["step"], p["M"]) for p in along["broad"]] == [(0, 0.9), (5, 0.8), (10, 0.5)]
    text = "\n".join(analyses({"along_training": {"distill": along},
                               "targeted_heldout": {"select_uniform": out["select_uniform"]}}))
    assert "distill: held-out M and F along training" in text and "step     5  M 0.800" in text
    assert "select_uniform: held-out M on the documents nearest select's targeted clusters" in text
    assert json.loads(json.dumps(out)) == out  # as report.json keeps it
