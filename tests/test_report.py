"""The report's comparison tables read each stage's final test-set value (validation only as fallback)."""

from stages.report import comparisons


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
        "distill": {"val/docs/M": 0.35, "val/docs/F": 0.02},
        "distill_nll": {"val/docs/M": 0.33, "val/docs/F": 0.19},
    }}
    lines = comparisons(report)
    assert [line.split()[-1] for line in lines[1:4]] == ["0.600", "0.700", "0.540"]
    m_row = next(line for line in lines if line.split()[0] == "M")
    f_row = next(line for line in lines if line.split()[0] == "F")
    assert m_row.split()[1:] == ["0.330", "0.350"] and f_row.split()[1:] == ["0.190", "0.020"]
    assert not any("stage 4" in line for line in lines)  # select_uniform did not run
