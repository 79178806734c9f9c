"""Checkpoints that are never half-written, resume that falls back past a damaged one, and the
final Hugging Face export.

A checkpoint is written aside as `checkpoints/.tmp-step_N/` by every trainer rank (DeepSpeed
shards: model, optimizer, scheduler; plus each rank's RNG states and the data position, which is
the step). Rank 0 then records every file's size in `manifest.json`, with what the sample order
depends on (data content, seed, batch sizes: `schedule`), renames the folder to
`step_N` and only then points `latest` at it (written aside and renamed), and finally deletes
checkpoints beyond `checkpoint.keep_last`. A crash at any moment leaves `latest` on a complete
checkpoint. On resume the newest checkpoint whose files match their manifest is used; a damaged
one is skipped with a warning, and one written under another schedule is refused (the resumed run
would silently follow another sample order) unless `checkpoint.allow_schedule_change` says so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import yaml
from transformers import PreTrainedTokenizerBase

from poft_ds.data.prepare import PreparedData
from poft_ds.distributed import Worlds, bridge_broadcast_int
from poft_ds.environment import ENVIRONMENT_FILE
from poft_ds.files import atomic_write
from poft_ds.spec import JobSpec

MANIFEST = "manifest.json"


def checkpoint_root(spec: JobSpec) -> Path:
    return Path(spec.run_dir) / "checkpoints"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine: deepspeed.DeepSpeedEngine, spec: JobSpec, step: int, schedule: dict[str, Any]) -> Path:
    """Write a complete checkpoint for optimizer step `step`; every trainer rank must call this.

    Args:
        engine: The trainer engine.
        spec: The job.
        step: Optimizer steps done.
        schedule: What the sample order depends on (`Schedule.fingerprint`), checked on resume.

    Raises:
        RuntimeError: when the checkpoint cannot be written (e.g. a full disk); the previous
            checkpoint and `latest` are left as they were.
    """
    root = checkpoint_root(spec)
    tag, tmp_tag = _tag(step), f".tmp-{_tag(step)}"
    rank = dist.get_rank()
    try:
        if rank == 0:
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
        # DeepSpeed keeps only rank 0's client state; each rank's random streams go in their own file.
        torch.save(_rng_states(), root / tmp_tag / f"rng_rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            folder = root / tmp_tag
            save_resolved_spec(spec, folder)
            environment = Path(spec.run_dir) / ENVIRONMENT_FILE
            if environment.is_file():  # what this checkpoint was trained with
                shutil.copyfile(environment, folder / ENVIRONMENT_FILE)
            sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
            manifest = {"step": step, "schedule": schedule, "files": sizes}
            atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
            shutil.rmtree(root / tag, ignore_errors=True)
            os.replace(folder, root / tag)
            atomic_write(root / "latest", tag.encode())
            _prune(root, spec.checkpoint.keep_last)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        free = shutil.disk_usage(root).free if root.exists() else 0
        raise RuntimeError(
            f"[trainer rank {rank}] could not write checkpoint {tag} under {root} ({free} bytes free): {e}. "
            f"The previous checkpoint ({_read_latest(root) or 'none'}) is intact; free space and resume."
        ) from e
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)


def _read_latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except OSError:
        return None


def verify(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used, or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"no readable manifest ({e})"
    for name, size in manifest["files"].items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} expected (truncated?)"
    return None


def newest_valid_checkpoint(spec: JobSpec) -> tuple[int, Path] | None:
    """The newest checkpoint that verifies, trying `latest` first; damaged ones are warned about."""
    root = checkpoint_root(spec)
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    latest = _read_latest(root)
    if latest and (root / latest).is_dir():
        candidates = [root / latest] + [c for c in candidates if c.name != latest]
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            return json.loads((folder / MANIFEST).read_text())["step"], folder
        warnings.warn(f"checkpoint {folder} is damaged ({problem}); falling back to an older one", stacklevel=2)
    return None


def schedule_changes(folder: Path, schedule: dict[str, Any]) -> list[str]:
    """What differs between the schedule a checkpoint was written under and `schedule`."""
    saved = json.loads((folder / MANIFEST).read_text()).get("schedule", {})
    return [
        f"{key}: {saved.get(key)!r} in the checkpoint, {schedule.get(key)!r} now"
        for key in sorted(set(saved) | set(schedule))
        if saved.get(key) != schedule.get(key)
    ]


def _rng_states() -> dict[str, Any]:
    states = {"cpu": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, folder: Path) -> int:
    """Restore model, optimizer, scheduler and every RNG state; returns the step to continue from."""
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
    _restore_rng_states(torch.load(folder / f"rng_rank{dist.get_rank()}.pt", weights_only=False))
    return int(client["step"])


def export_hf_model(engine: deepspeed.DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Gather the ZeRO-3 shards and write a Hugging Face model directory (safetensors + tokenizer).

    Every trainer rank must call this (the gather is collective); rank 0 writes, aside first.
    """
    # Gathers one layer at a time, so no rank holds two copies of the model.
    state = engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise RuntimeError(f"refusing to export non-finite weights ({bad[:3]}...)")
        lm = engine.module.lm
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()


def save_resolved_spec(spec: JobSpec, folder: Path) -> None:
    """Write the resolved spec (what actually ran) as YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.resolved.yaml").write_text(yaml.safe_dump(spec.public_dump(), sort_keys=False))


REFUSED = -1  # broadcast instead of a step when global rank 0 refuses to resume


def agree_on_resume_step(spec: JobSpec, worlds: Worlds, data: PreparedData) -> int:
    """The step every rank continues from: global rank 0 (trainer 0) picks the newest verified
    checkpoint (`checkpoint.resume: auto`), or 0; the choice is broadcast to all ranks.

    A checkpoint written under another schedule (data, seed, batch sizes, filters) is refused
    unless `checkpoint.allow_schedule_change` is set: the run would silently follow another order.

    Raises:
        RuntimeError: with `checkpoint.resume: required` and no usable checkpoint, or when the
            schedule changed.
    """
    step, refusal = 0, ""
    if worlds.identity.global_rank == 0 and spec.checkpoint.resume != "never":
        found = newest_valid_checkpoint(spec)
        step = found[0] if found else 0
        changes = schedule_changes(found[1], data.fingerprint(spec)) if found else []
        if changes and spec.checkpoint.allow_schedule_change:
            print(f"[poft-ds] resuming {found[1]} under a changed schedule: {'; '.join(changes)}", flush=True)
        elif changes:
            step, refusal = (
                REFUSED,
                (
                    f"refusing to resume from {found[1]}: the schedule changed since it was written "
                    f"({'; '.join(changes)}). Restore the old data and settings, use a new run_dir, or set "
                    "checkpoint.allow_schedule_change: true to continue with a different sample order"
                ),
            )
    step = bridge_broadcast_int(worlds, step)
    if step == REFUSED:
        raise RuntimeError(refusal or "global rank 0 refused to resume (the schedule changed; see its message)")
    if step == 0 and spec.checkpoint.resume == "required":
        raise RuntimeError(f"checkpoint.resume: required, but {spec.run_dir}/checkpoints has no usable checkpoint")
    return step
