"""Loading the causal LLM: any transformers model id/path (optionally 4/8-bit, LoRA), or a random
model built from a config for tests, with a character tokenizer and a ChatML template."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from speechllm.config import LLMConfig, plain

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML special tokens (tests need no Hub download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(alphabet + "\n" + "abcdefghijklmnopqrstuvwxyz:"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"llm.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _weights_are_meta() -> bool:
    """Whether parameters created now land on the meta device (inside ``init_empty_weights``)."""
    return torch.nn.Linear(1, 1).weight.is_meta


def build_llm(cfg: LLMConfig, *, empty: bool = False):
    """Return ``(model, tokenizer)``; the model is frozen unless ``freeze: false``, LoRA applied if enabled.

    ``empty``: the weights on the meta device (no memory, nothing read but the config), buffers real:
    what every FSDP rank builds before sharding, the values then arriving shard by shard
    (:mod:`speechllm.sharding`).
    """
    if empty:
        if cfg.load_in_4bit or cfg.load_in_8bit:
            raise ValueError("trainer.strategy fsdp shards full-precision weights: set llm.load_in_4bit/load_in_8bit false")
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model, tokenizer = build_llm(cfg)
        model.tie_weights()  # the meta-device hook re-creates every parameter, so tied ones come apart
        return model, tokenizer
    attention = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.from_config is not None:
        tokenizer = build_char_tokenizer(cfg.char_alphabet)
        kwargs = plain(cfg.from_config)
        model_type = kwargs.pop("model_type", "llama")
        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **kwargs,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype(cfg.dtype), **attention)
    else:
        if not cfg.pretrained:
            raise ValueError("llm: set `pretrained` (Hub id or local path) or `from_config`")
        quant = None
        if cfg.load_in_4bit or cfg.load_in_8bit:
            from transformers import BitsAndBytesConfig

            quant = BitsAndBytesConfig(
                load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
                bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_dtype(cfg.dtype),
            )
        gguf = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        if _weights_are_meta():  # (build_llm(empty=True)) the config is all an empty build reads
            config = AutoConfig.from_pretrained(cfg.pretrained, **gguf)
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype(cfg.dtype), **attention)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.pretrained, dtype=_dtype(cfg.dtype), quantization_config=quant, low_cpu_mem_usage=True,
                **gguf, **attention)
        tok_kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer else {}
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.pretrained, **tok_kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"LLM tokenizer {cfg.tokenizer or cfg.pretrained} has no EOS token")

    if cfg.freeze or cfg.lora.enabled:
        model.requires_grad_(False)
    if cfg.load_in_4bit or cfg.load_in_8bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        # Per decoder layer; non-reentrant, the variant that composes with FSDP and frozen inputs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        # Seeded like from_config weights: the adapters start the same however and wherever the model
        # is built (an FSDP rank 0 builds it after the others have drawn their random numbers).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
            ))
    if not any(p.requires_grad for p in model.parameters()):
        model.eval()  # a fully frozen LLM never needs dropout
    return model, tokenizer
