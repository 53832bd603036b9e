"""`python -m stages`: one argparse tree; every command declares its options and has a help line.

Parsing only: no command runs (run_pipeline is replaced where a test needs a command to be reached).
"""

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from speechllm.config import ConfigError
from stages import __main__ as cli

# each command with the arguments it requires (placeholders: nothing is read before parsing ends)
REQUIRED = {
    "run": ["p.yaml"],
    "status": ["p.yaml"],
    "schema": [],
    "decode": ["--model", "m", "--manifest", "x.jsonl", "--out", "y.jsonl"],
    "transcribe": ["--model", "m", "a.wav"],
    "export": ["--model", "m", "--out", "o"],
    "report": ["p.yaml"],
    "bench": ["levers"],
    "faults": [],
    "estimate": ["p.yaml"],
    "prepare tiny": ["--out", "o"],
    "prepare demo-data": ["o"],
    "prepare ctc-head": ["--train", "a.jsonl", "--eval", "b.jsonl", "--out", "o"],
    "prepare posterior-stats": ["--pipeline", "p.yaml", "--manifest", "x.jsonl"],
    "prepare word-times": ["--pipeline", "p.yaml", "--manifest", "x.jsonl", "--out", "y.jsonl"],
    "prepare real-speech": ["--out", "o"],
    "prepare broad-text": ["--out", "o"],
    "prepare mixture": ["--out", "o.jsonl", "a=x.jsonl"],
    "prepare simulator": ["--pipeline", "p.yaml", "--manifest", "x.jsonl", "--heldout", "y.jsonl"],
    "prepare librispeech": ["--root", "r", "--out", "o"],
    "prepare common-voice": ["--root", "r", "--out", "o"],
    "prepare libriheavy": ["--cuts", "c.jsonl", "--out", "o.jsonl"],
    "prepare text-corpus": ["--input", "x.jsonl", "--out", "o.jsonl"],
}


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code


def _flat(text: str) -> str:
    return " ".join(text.split())  # argparse wraps help lines


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    parser.format_help()  # a command parser declares its options (here: its steps) when first used
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_has_a_parser():
    assert set(REQUIRED) == {*cli.COMMANDS.keys() - {"prepare"}, *(f"prepare {s}" for s in cli.PREPARE_STEPS)}


def test_help_lists_every_command_and_step_with_its_purpose(capsys):
    assert _exit_code(["--help"]) == 0
    out = _flat(capsys.readouterr().out)
    for name, (purpose, _) in cli.COMMANDS.items():
        assert f"{name} {_flat(purpose)}" in out
    assert _exit_code(["prepare", "--help"]) == 0
    out = _flat(capsys.readouterr().out)
    for name, (purpose, _) in cli.PREPARE_STEPS.items():
        assert f"{name} {_flat(purpose)}" in out


def test_help_does_not_import_the_commands():
    import subprocess

    code = "import sys; from stages.__main__ import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "print(sorted(m for m in sys.modules if m.startswith(('stages.', 'torch', 'speechllm'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[-1] == "['stages.__main__']"


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_command_help_exits_0_and_every_option_has_help_text(command, capsys):
    assert _exit_code([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m stages {command} ")
    parser = cli.build_parser()
    for word in command.split():
        parser = _subcommands(parser)[word]
    parser.format_help()  # declares the options
    missing = [a.dest for a in parser._actions if not a.help]
    assert not missing, f"{command}: options without help text: {missing}"


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_unknown_option_is_argparse_usage_error(command, capsys):
    assert _exit_code([*command.split(), *REQUIRED[command], "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: python -m stages {command} ")
    assert f"python -m stages {command}: error: unrecognized arguments: --no-such-option" in err


@pytest.mark.parametrize("argv", [[], ["prepare"], ["no-such-command"], ["prepare", "no-such-step"]])
def test_missing_or_unknown_command_exits_2(argv, capsys):
    assert _exit_code(argv) == 2
    assert "error:" in capsys.readouterr().err


@pytest.fixture
def pipeline_calls(monkeypatch):
    """`stages.runner` replaced by a recorder: run/status parse and call it, nothing runs."""
    calls = []

    def run_pipeline(*args, **kwargs):
        calls.append(("run", args, kwargs))
        return {}

    def pipeline_status(*args, **kwargs):
        calls.append(("status", args, kwargs))
        return []

    monkeypatch.setitem(sys.modules, "stages.runner", SimpleNamespace(run_pipeline=run_pipeline,
                                                                     pipeline_status=pipeline_status))
    return calls


def test_overrides_before_and_after_options_reach_run(pipeline_calls, capsys):
    assert cli.main(["run", "p.yaml", "a=1", "--only", "align", "b.c=2", "--redo", "d=x=y",
                     "--only", "asr", "--run-dir", "r"]) == 0
    ((what, args, kwargs),) = pipeline_calls
    assert what == "run"
    assert args == ("p.yaml", ["a=1", "b.c=2", "d=x=y"], ["align", "asr"], True, "r", None)
    assert not kwargs.get("force")
    capsys.readouterr()


def test_force_reaches_run(pipeline_calls):
    assert cli.main(["run", "p.yaml", "--redo", "--force"]) == 0
    assert pipeline_calls[0][2] == {"force": True}


def test_overrides_after_options_reach_status(pipeline_calls):
    assert cli.main(["status", "p.yaml", "--scale", "full", "a=1"]) == 0
    assert pipeline_calls == [("status", ("p.yaml", ["a=1"], None, "full"), {})]


def test_a_stray_word_after_the_options_is_an_error(pipeline_calls, capsys):
    assert _exit_code(["run", "p.yaml", "--redo", "stray"]) == 2
    assert "python -m stages run: error: unrecognized arguments: stray" in capsys.readouterr().err
    assert pipeline_calls == []


def test_config_error_prints_error_and_exits_2(monkeypatch, capsys):
    def run_pipeline(*args, **kwargs):
        raise ConfigError("p.yaml: unknown key 'modle'")

    monkeypatch.setitem(sys.modules, "stages.runner", SimpleNamespace(run_pipeline=run_pipeline))
    assert cli.main(["run", "p.yaml"]) == 2
    assert capsys.readouterr().err == "error: p.yaml: unknown key 'modle'\n"


def test_a_step_main_is_the_same_command_line(capsys):
    from stages.prepare_word_times import main

    with pytest.raises(SystemExit) as exc:
        main(["--no-such-option"])
    assert exc.value.code == 2
    assert "usage: python -m stages prepare word-times " in capsys.readouterr().err


def test_schema_shows_each_key_with_its_choices_default_and_help(capsys):
    assert cli.main(["schema", "optim."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("optim.") for line in lines)
    assert "optim.schedule: cosine | constant | wsd = 'cosine'  # after warm-up" in "\n".join(lines)
    assert cli.main(["schema", "data.sources"]) == 0
    assert "data.sources.<name>.kind: speech | simulated | text = 'speech'" in capsys.readouterr().out
    assert cli.main(["schema", "no.such."]) == 2
