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
        if not isinstance(node, dict):
            raise SpecError(f"{source}: '{p}' must be a JSON object (it holds '{leaf}'), got {node!r}")
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        raise SpecError(
            f"{source}: '{dotted}' is {current!r} but the spec's {spec_field} makes it {value!r}; "
            f'set it to "auto" or remove it'
        )
    node[leaf] = value


def _read(path: str) -> dict[str, Any]:
    try:
        cfg = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read DeepSpeed config: {e}") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: a DeepSpeed config is a JSON object, got a JSON {type(cfg).__name__}")
    return cfg


def _zero3(cfg: dict[str, Any], src: str) -> dict[str, Any]:
    """The config's `zero_optimization` section, which must ask for stage 3."""
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage != 3:
        raise SpecError(
            f"{src}: zero_optimization.stage must be 3 (poft-ds shards the models with ZeRO-3), got {stage}"
        )
    return zero


# What DeepSpeed can step with the optimizer state offloaded: its CPU Adam (in AdamW mode here).
_OFFLOADABLE = ("adam", "adamw")


def _check_optimizer(cfg: dict[str, Any], zero: dict[str, Any], src: str) -> None:
    """poft-ds builds the optimizer from training.* itself; the config may only offload it."""
    offload = zero.get("offload_optimizer") or {}
    if not isinstance(offload, dict):
        raise SpecError(f"{src}: zero_optimization.offload_optimizer must be a JSON object, got {offload!r}")
    device = offload.get("device", "none")
    if device not in ("none", "cpu", "nvme"):
        raise SpecError(f"{src}: zero_optimization.offload_optimizer.device must be none, cpu or nvme, got {device!r}")
    if device == "nvme" and not offload.get("nvme_path"):
        raise SpecError(f"{src}: zero_optimization.offload_optimizer.device 'nvme' needs an nvme_path")
    if "optimizer" in cfg:
        kind = cfg["optimizer"].get("type") if isinstance(cfg["optimizer"], dict) else cfg["optimizer"]
        if device != "none" and str(kind).lower() not in _OFFLOADABLE:
            raise SpecError(
                f"{src}: optimizer {kind!r} cannot run with offload_optimizer (device {device!r}): DeepSpeed "
                "steps offloaded optimizer state with its CPU Adam only; remove the optimizer section"
            )
        # DeepSpeed ignores it when given an optimizer, as poft-ds always does: never silently.
        raise SpecError(
            f"{src}: the optimizer section ({kind!r}) would be ignored: poft-ds builds AdamW from "
            "training.learning_rate, adam_betas, adam_eps and weight_decay; remove it"
        )


def trainer_config(spec: JobSpec, precision: str) -> dict[str, Any]:
    """The trainer ranks' DeepSpeed config, with the spec's batch sizes, clipping and precision."""
    src = spec.deepspeed.train_config
    cfg = _merge(_read(src), spec.deepspeed.overrides)
    t = spec.training
    _set(cfg, "train_batch_size", t.global_batch_size, src, "training.global_batch_size")
    _set(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, src, "training.micro_batch_size")
    _set(cfg, "gradient_accumulation_steps", spec.grad_accum_steps, src, "training.gradient_accumulation_steps")
    _set(cfg, "gradient_clipping", t.max_grad_norm, src, "training.max_grad_norm")
    # The trainer loop owns the accumulation boundary: a packed step has as many passes as its
    # samples need, so it calls `engine.step()` once per optimizer step, after every backward.
    _set(cfg, "managed_gradient_accumulation", False, src, "poft-ds's trainer loop (it calls step() once per step)")
    _set(cfg, "bf16.enabled", precision == "bf16", src, "training.precision")
    _check_optimizer(cfg, _zero3(cfg, src), src)
    return cfg


def reference_config(spec: JobSpec, precision: str) -> dict[str, Any]:
    """The reference ranks' ZeRO-3 inference config."""
    src = spec.deepspeed.reference_config
    cfg = _read(src)
    _set(cfg, "bf16.enabled", precision == "bf16", src, "training.precision")
    _zero3(cfg, src)
    return cfg
