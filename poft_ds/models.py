"""Loading Hugging Face models into DeepSpeed ZeRO-3 engines, and what each rank holds of them."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from poft_ds.distributed import Worlds, peak_memory_bytes, process_start_time
from poft_ds.environment import device_record, software
from poft_ds.files import atomic_write
from poft_ds.scoring import ResponseScorer, check_head
from poft_ds.spec import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Largest tolerated difference of a probe's mean log-probability between the direct output-head
# path and the model's forward: the same arithmetic agrees far closer; a head transform differs by
# whole nats.
HEAD_CHECK_ATOL = {"bf16": 2e-2, "fp32": 1e-4}


def load_scorer(model: ModelSpec, ds_config: dict[str, Any], precision: str) -> ResponseScorer:
    """Load a causal LM partitioned by ZeRO-3 from the start and wrap it for scoring.

    While an `HfDeepSpeedConfig` with stage 3 is alive, `from_pretrained` builds the model inside
    `deepspeed.zero.Init`, so no rank ever holds the whole model.
    """
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive through from_pretrained)
    lm = AutoModelForCausalLM.from_pretrained(
        model.path,
        dtype=DTYPES[precision],
        trust_remote_code=model.trust_remote_code,
        use_safetensors=None,
        **({"attn_implementation": model.attn_implementation} if model.attn_implementation else {}),
    )
    return ResponseScorer(lm, model.head_chunk_tokens)


def inference_engine(scorer: ResponseScorer, ds_config: dict[str, Any]) -> deepspeed.DeepSpeedEngine:
    """A ZeRO-3 inference engine: parameters sharded over the role world, no optimizer, eval mode."""
    for p in scorer.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=scorer, config=ds_config)
    engine.eval()
    return engine


def verify_head(engine: deepspeed.DeepSpeedEngine, worlds: Worlds, precision: str, name: str) -> None:
    """Check on a probe batch that scoring through the output head equals the model's forward.

    Every rank of the role calls this together; on a difference the scorer switches to the full
    forward, and role rank 0 says why.
    """
    was_training = engine.module.training
    engine.eval()
    why = check_head(engine, worlds.device, HEAD_CHECK_ATOL[precision])
    if was_training:
        engine.train()
    if why and worlds.role.rank == 0:
        print(f"[poft-ds] {name}: {why}", flush=True)


def shard_record(module: nn.Module) -> dict[str, Any]:
    """What this rank holds of a (possibly ZeRO-3 partitioned) model, parameter by parameter.

    A partitioned parameter keeps its full size in `ds_numel` and this rank's slice in
    `ds_tensor`; a persistent one (below `stage3_param_persistence_threshold`) is held whole.
    """
    params = []
    for name, p in module.named_parameters():
        full = getattr(p, "ds_numel", p.numel())
        persistent = bool(getattr(p, "ds_persist", False)) or not hasattr(p, "ds_tensor")
        params.append(
            {
                "name": name,
                "shape": list(getattr(p, "ds_shape", p.shape)),
                "numel": full,
                "local": full if persistent else p.ds_tensor.numel(),
                "persistent": persistent,
            }
        )
    total, local = sum(p["numel"] for p in params), sum(p["local"] for p in params)
    return {"numel": total, "local": local, "local_fraction": local / max(total, 1), "params": params}


def write_rank_record(
    run_dir: str, worlds: Worlds, model_path: str, module: nn.Module, optimizer: str | None = None
) -> None:
    """Write `ranks/rank<N>.json`: this rank's host, role, device, model, optimizer, software and shard of the model."""
    ident, role = worlds.identity, worlds.role
    record = {
        "host": socket.gethostname(),
        "global_rank": ident.global_rank,
        "role": role.name,
        "role_rank": role.rank,
        "role_size": role.size,
        "local_rank": ident.local_rank,
        "device": str(worlds.device),
        "device_info": device_record(worlds.device),
        "cpu_cores": sorted(os.sched_getaffinity(0)),
        "model": model_path,
        "optimizer": optimizer,
        "software": software(),
    } | shard_record(module)
    atomic_write(Path(run_dir) / "ranks" / f"rank{ident.global_rank}.json", json.dumps(record, indent=1).encode())


def rank_table(run_dir: str, world_size: int) -> str:
    """The start-up table: every rank's host, global rank, role, device, model and shard.

    Read from the `ranks/rank<N>.json` files; a rank that has not written its file yet shows "-".
    """
    header = ("rank", "role", "host", "device", "model", "holds")
    rows = []
    for r in range(world_size):
        f = Path(run_dir) / "ranks" / f"rank{r}.json"
        if not f.is_file():
            rows.append((str(r), "-", "-", "-", "-", "-"))
            continue
        rec = json.loads(f.read_text())
        whole = sum(p["persistent"] for p in rec["params"])
        holds = f"{100 * rec['local_fraction']:.1f}% of {rec['numel']:,} parameters ({whole}/{len(rec['params'])} tensors whole)"
        role = f"{rec['role']} {rec['role_rank']}/{rec['role_size']}"
        rows.append((str(r), role, rec["host"], rec["device"], Path(rec["model"]).name, holds))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])


def write_rank_summary(run_dir: str, worlds: Worlds, tokens: int, processed_tokens: int, busy_s: float) -> None:
    """Write `ranks/summary_rank<N>.json` when this rank is done: its work and its peak memory.

    Args:
        run_dir: The job's run directory.
        worlds: This rank's worlds.
        tokens: Real tokens this rank ran forward passes over.
        processed_tokens: Tokens including padding and empty passes.
        busy_s: Seconds spent in forward (and backward) passes.
    """
    device = worlds.device
    record = {
        "role": worlds.role.name,
        "tokens": tokens,
        "processed_tokens": processed_tokens,
        "padding_efficiency": tokens / processed_tokens if processed_tokens else None,
        "busy_s": busy_s,
        "tokens_per_busy_s": tokens / busy_s if busy_s else None,
        "wall_s": time.time() - process_start_time(),
        "peak_rss_bytes": peak_memory_bytes(torch.device("cpu")),
        "peak_device_bytes": peak_memory_bytes(device) if device.type == "cuda" else None,
    }
    path = Path(run_dir) / "ranks" / f"summary_rank{worlds.identity.global_rank}.json"
    atomic_write(path, json.dumps(record, indent=1).encode())
