"""Checkpoints and the final Hugging Face export."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from poft_ds.job import save_resolved_spec
from poft_ds.spec import JobSpec


def save_checkpoint(engine: deepspeed.DeepSpeedEngine, spec: JobSpec, step: int) -> Path:
    """Write a DeepSpeed checkpoint (model, optimizer, scheduler shards) for optimizer step `step`.

    Every trainer rank must call this. DeepSpeed writes `latest` after the shards.
    """
    root = Path(spec.run_dir) / "checkpoints"
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    if dist.get_rank() == 0:
        save_resolved_spec(spec, root / tag)
    return root / tag


def export_hf_model(engine: deepspeed.DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Gather the ZeRO-3 shards and write a Hugging Face model directory (safetensors + tokenizer).

    Every trainer rank must call this (the gather is collective); rank 0 writes.
    """
    # Gathers one layer at a time, so no rank holds two copies of the model.
    state = engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        lm = engine.module.lm
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        out.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    dist.barrier()
