"""DeepSpeed configs: read the JSON a spec names and write the spec's numbers into it.

The spec is the one source of truth. A config entry that the spec also sets must be "auto" (or
absent) in the file; any other value that disagrees is an error naming both, so the two can
never silently differ.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from poft_ds.spec import JobSpec, SpecError


def resolve_precision(spec: JobSpec, device: torch.device) -> str:
    """The precision a run uses: bf16 where the device supports it under `auto`, else fp32."""
    want = spec.training.precision
    if want == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if want == "bf16" and device.type == "cpu":
        raise SpecError("training.precision: bf16 is not supported on CPU ranks; use auto or fp32")
    return want


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(cfg: dict[str, Any], dotted: str, value: Any, source: str, spec_field: str) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        raise SpecError(
            f"{source}: '{dotted}' is {current!r} but the spec's {spec_field} makes it {value!r}; "
            f'set it to "auto" or remove it'
        )
    node[leaf] = value


def _read(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: cannot read DeepSpeed config: {e}") from e


def trainer_config(spec: JobSpec, precision: str) -> dict[str, Any]:
    """The trainer ranks' DeepSpeed config, with the spec's batch sizes, clipping and precision."""
    src = spec.deepspeed.train_config
    cfg = _merge(_read(src), spec.deepspeed.overrides)
    t = spec.training
    _set(cfg, "train_batch_size", t.global_batch_size, src, "training.global_batch_size")
    _set(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, src, "training.micro_batch_size")
    _set(cfg, "gradient_accumulation_steps", spec.grad_accum_steps, src, "training.gradient_accumulation_steps")
    _set(cfg, "gradient_clipping", t.max_grad_norm, src, "training.max_grad_norm")
    _set(cfg, "bf16.enabled", precision == "bf16", src, "training.precision")
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise SpecError(
            f"{src}: zero_optimization.stage must be 3 (poft-ds shards the target with ZeRO-3), got {stage}"
        )
    return cfg


def reference_config(spec: JobSpec, precision: str) -> dict[str, Any]:
    """The reference ranks' ZeRO-3 inference config."""
    src = spec.deepspeed.reference_config
    cfg = _read(src)
    _set(cfg, "bf16.enabled", precision == "bf16", src, "training.precision")
    return cfg
