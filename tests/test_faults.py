"""`python -m stages faults` (`make faults`): every injected fault is handled, nothing is lost."""

import json
import re
import subprocess
import sys
from pathlib import Path

from stages.faults import RANK_MARGIN_S, RANK_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"missing audio", "unreadable audio", "wrong sample rate", "audio too long", "empty transcript",
            "non-text transcript", "NaN/inf loss", "unknown config key", "missing model path",
            "disk full while saving", "SIGKILL during training", "SIGKILL while writing a checkpoint",
            "one rank of two dies", "sequence longer than the LLM context"}


def test_fault_table_covers_every_fault_and_loses_nothing(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "-m", "stages", "faults", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    rows = json.loads(out.read_text())
    failed = [(r["fault"], r["happened"]) for r in rows if not r["ok"]]
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-2000:]
    assert REQUIRED <= {r["fault"].split(" (")[0] for r in rows}
    assert all(r["lost"].startswith("none") for r in rows)
    assert "| fault | what happened | data lost |" in proc.stdout
    by_name = {r["fault"].split(" (")[0]: r for r in rows}
    # Graded from what was observed: the survivor of a rank's death ended within the collective
    # timeout plus a margin (not a hang that happened to end), and the bad commands left the files
    # of a run as they were / let the corrected command run.
    ended = re.search(r"rank 0 ended (\d+) s later", by_name["one rank of two dies"]["happened"])
    assert ended and int(ended.group(1)) <= RANK_TIMEOUT_S + RANK_MARGIN_S, by_name["one rank of two dies"]
    assert "last.ckpt of step 2 among them, unchanged" in by_name["unknown config key"]["lost"]
    assert "the corrected command then trained and finished" in by_name["missing model path"]["lost"]
    assert "finite tensors" in by_name["NaN loss at every step"]["lost"] or "no checkpoint" in by_name["NaN loss at every step"]["lost"]
