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
        "distill": {"val/docs/M": 0.35, "val/docs/M_low": 0.3, "val/docs/M_high": 0.4, "val/docs/F": 0.02},
        "distill_nll": {"val/docs/M": 0.33, "val/docs/F": 0.19},
    }}
    lines = comparisons(report)
    assert [line.split()[-1] for line in lines[1:4]] == ["0.600", "0.700", "0.540"]
    m_row = next(line for line in lines if line.split()[0] == "M")
    f_row = next(line for line in lines if line.split()[0] == "F")
    assert m_row.split()[1:] == ["0.330", "0.350", "[0.300,", "0.400]"] and f_row.split()[1:] == ["0.190", "0.020"]
    assert not any("stage 4" in line for line in lines)  # select_uniform did not run


def test_a_stages_lines_show_each_interval():
    metrics = {"steps": 10, "kind": "distill", "initial/val/docs/M": 0.35, "initial/val/docs/M_low": 0.33,
               "initial/val/docs/M_high": 0.37, "val/docs/M": 0.287, "val/docs/M_low": 0.27, "val/docs/M_high": 0.305,
               "val/docs/M_positions": 900}
    text = format_report({"pipeline": "p", "scale": None, "baselines": {}, "stages": {"distill": metrics}})
    assert "M                          0.350 [0.330, 0.370] -> 0.287 [0.270, 0.305]" in text
    assert "M_low" not in text and "positions" not in text
