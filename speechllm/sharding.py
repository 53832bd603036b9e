"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for a :class:`SpeechLLM`.

Every rank builds the LLM (and a frozen teacher copy) *empty*: weights on the meta device, buffers real
(``SpeechLLM.build(..., empty_llm=True)``). :func:`shard` then cuts the model into FSDP units (each
decoder layer, the embedding and the LM head (one unit when they are tied), the rest of each
decoder, the projector), gives each rank memory for its own shards only, and fills them from the
weights rank 0 alone built (:func:`rank0_weights`: one full copy on rank 0's CPU, none on the others).
The frozen speech encoder stays whole on every rank, outside FSDP (``ignored_params``): it is small
next to the LLM and trains nothing.

FSDP2 runs its collectives from the hooks of one root module, and our steps call the LLM's parts
directly (the embedding, the decoder, the LM head chunk by chunk), never one ``forward``: the root is a
:class:`StepRoot`, whose forward runs a given step function, so each whole step happens inside it.
Trainable, frozen and LoRA parameters mix freely within a unit (FSDP2 shards each parameter on its own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from speechllm.llm import build_llm


class StepRoot(nn.Module):
    """The FSDP root around a model: ``root(fn, *args)`` runs ``fn(*args)`` inside the root's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def rank0_weights(model) -> dict[str, torch.Tensor]:
    """The full weights of an empty-built model's LLM (and teacher), keyed as in ``model.state_dict()``:
    the LLM built for real once, here. Unit-embedding initialisations of the projector need the real
    embedding table, so they run here too, and the projector's weights are included."""
    llm, _ = build_llm(model.cfg.llm)
    weights = {f"llm.{k}": v for k, v in llm.state_dict().items()}
    model.init_projector_from(llm)
    weights.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    if model.teacher_llm is not None:
        teacher, _ = build_llm(model.teacher_config())
        weights.update({f"teacher_llm.{k}": v for k, v in teacher.state_dict().items()})
    return weights


def _shard_llm(llm: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    decoder = llm.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    embedding, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if head.weight is embedding.weight:  # tied: one matrix, one unit of both modules
        fully_shard([embedding, head], mesh=mesh)
    else:
        fully_shard(embedding, mesh=mesh)
        fully_shard(head, mesh=mesh)
    fully_shard(decoder, mesh=mesh)  # the final norm (and whatever else the decoder holds)


def _materialise(llm: nn.Module, device: torch.device) -> None:
    """Memory for the local shards of meta parameters; the buffers (rotary tables, computed at build)
    keep their values."""
    buffers = {name: b.detach().clone() for name, b in llm.named_buffers()}
    llm.to_empty(device=device)
    with torch.no_grad():
        for name, b in llm.named_buffers():
            b.copy_(buffers[name])


def shard(model, mesh, weights: dict[str, torch.Tensor], device: torch.device) -> StepRoot:
    """Shard an empty-built ``model`` over ``mesh`` and load ``weights`` (rank 0's :func:`rank0_weights`;
    ``{}`` on the other ranks, which receive their shards from it). Returns the root to run steps in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    llms = [m for m in (model.llm, model.teacher_llm) if m is not None]
    for llm in llms:
        _shard_llm(llm, mesh)
    fully_shard(model.projector, mesh=mesh)
    root = StepRoot(model)
    fully_shard(root, mesh=mesh, ignored_params=set(model.encoder.parameters()))
    for llm in llms:
        _materialise(llm, device)
    # strict=False: the encoder's weights, not sharded, are not sent.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(root, {f"model.{k}": v for k, v in weights.items()}, options=options)
    return root


def gathered_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights of a sharded ``module``, whole, on rank 0's CPU (``{}`` on the other ranks,
    which must all call this): the frozen ones are never gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    # (a frozen tied matrix still comes back under its second name: kept out by name)
    return {k: v for k, v in get_model_state_dict(module, options=options).items() if k in trained}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (itself unless it is sharded)."""
    return t.to_local() if hasattr(t, "to_local") else t
