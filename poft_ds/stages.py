"""Staged jobs: one spec, several trainings in a row (e.g. PoFT, then DPO from its result).

A spec with `stages:` is a base spec plus a list of stages, each a `name` and the sections it
changes. A stage's spec is the base with the stage's sections merged in (mappings merged key by
key, anything else replaced); it runs in `<run_dir>/<name>/`, a run directory of its own. Each
stage after the first starts from the previous stage's `final_model/` (unless it names its own
`model.path`), and a DPO stage's reference model is, by default, that same starting point.
Aligned models in the base apply to PoFT stages only.

`poft-ds launch` runs the stages in order. A finished stage leaves `STAGE_DONE` (holding a hash
of the spec it ran) and is skipped by later launches; an unfinished one is launched again and
resumes from its checkpoint. A finished stage whose spec has since changed is refused, not rerun
silently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from poft_ds.files import atomic_write
from poft_ds.spec import JobSpec, SpecError, read_spec_file, resolve_path, spec_from_mapping

DONE_MARKER = "STAGE_DONE"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Stage:
    """One stage of a staged job.

    Attributes:
        name: The stage's name (its folder under the job's run directory).
        raw: Its spec as a mapping, before validation (paths relative to `base`).
        run_dir: Its run directory.
        after: The stage before it, or None for the first.
        own_model: Whether the stage names its own `model.path` (else it continues the previous one).
    """

    name: str
    raw: dict[str, Any]
    run_dir: Path
    after: Stage | None
    own_model: bool = False

    @property
    def final_model(self) -> Path:
        return self.run_dir / "final_model"


def is_staged(path: str | Path) -> bool:
    """Whether a spec file holds a staged job."""
    return "stages" in read_spec_file(Path(path))


def read_stages(path: str | Path) -> tuple[list[Stage], Path]:
    """The stages of a staged spec file, and the folder its relative paths are resolved against.

    Raises:
        SpecError: naming the file and the stage when the stages are malformed.
    """
    path = Path(path)
    base_raw = read_spec_file(path)
    base = path.resolve().parent
    listed = base_raw.pop("stages")
    if not isinstance(listed, list) or not listed:
        raise SpecError(f"{path}: stages: a non-empty list of stages, each a mapping with a name")
    if "run_dir" not in base_raw:
        raise SpecError(f"{path}: run_dir: Field required (each stage runs in <run_dir>/<stage name>)")
    root = Path(resolve_path(str(base_raw.pop("run_dir")), base))
    stages: list[Stage] = []
    seen = set()
    for i, overrides in enumerate(listed):
        where = f"{path}: stages[{i}]"
        if not isinstance(overrides, dict) or not isinstance(overrides.get("name"), str):
            raise SpecError(f"{where}: a stage is a mapping with a `name` and the sections it changes")
        overrides = dict(overrides)
        name = overrides.pop("name")
        if not _NAME.fullmatch(name) or name in seen:
            raise SpecError(f"{where}.name: {name!r} must be unique and made of letters, digits, '.', '_' or '-'")
        seen.add(name)
        for field in ("run_dir", "stages"):
            if field in overrides:
                raise SpecError(f"{where}.{field}: set by the staged job, not by a stage")
        unknown = sorted(set(overrides) - set(JobSpec.model_fields))
        if unknown:
            raise SpecError(f"{where}: unknown sections {unknown}")
        raw = _merge(base_raw, overrides)
        objective = raw.get("objective")
        kind = objective.get("kind", "poft") if isinstance(objective, dict) else "poft"
        if kind != "poft" and "aligned_models" not in overrides:
            raw.pop("aligned_models", None)  # the base's aligned models are PoFT's
        raw["run_dir"] = str(root / name)
        own_model = isinstance(overrides.get("model"), dict) and "path" in overrides["model"]
        stages.append(Stage(name, raw, root / name, stages[-1] if stages else None, own_model))
    return stages, base


def stage_spec(
    stage: Stage, base: Path, where: str, check_templates: Callable[[JobSpec], None] | None = None
) -> tuple[JobSpec, str | None]:
    """A stage's validated spec, starting from the previous stage's final model.

    Before the previous stage has produced its model, the stage is validated against the model
    that stage starts from (same architecture and tokenizer); the returned note says so.

    Returns:
        (spec, a note, or None).
    """
    raw, note = copy.deepcopy(stage.raw), None
    if stage.after is not None and not stage.own_model:
        path, revision = _starting_model(stage)
        model = {k: v for k, v in (raw.get("model") or {}).items() if k != "revision"}
        model["path"] = path
        if revision is not None:
            model["revision"] = revision
        raw["model"] = model
        if path != str(stage.after.final_model):
            note = (
                f"stage {stage.name}: checked against {path}; it will start from stage {stage.after.name}'s "
                f"{stage.after.final_model}"
            )
    return spec_from_mapping(raw, base, f"{where} (stage {stage.name})", check_templates), note


def _starting_model(stage: Stage) -> tuple[str, str | None]:
    """The model (path or hub id, and revision) a stage starts from, as far as it exists now."""
    if stage.after is None or stage.own_model:
        model = stage.raw.get("model") or {}
        return model.get("path"), model.get("revision")
    if stage.after.final_model.is_dir():
        return str(stage.after.final_model), None
    return _starting_model(stage.after)


def spec_hash(spec: JobSpec) -> str:
    """What a finished stage records of the spec it ran, to notice a later change."""
    return hashlib.sha256(json.dumps(spec.public_dump(), sort_keys=True).encode()).hexdigest()[:16]


def finished(stage: Stage) -> str | None:
    """The spec hash a finished stage recorded, or None when it has not finished."""
    marker = stage.run_dir / DONE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())["spec_hash"]


def mark_finished(stage: Stage, spec: JobSpec) -> None:
    """Record that a stage finished (after its launch returned 0 and its model is written)."""
    atomic_write(
        stage.run_dir / DONE_MARKER, (json.dumps({"stage": stage.name, "spec_hash": spec_hash(spec)}) + "\n").encode()
    )


def write_stage_spec(stage: Stage, spec: JobSpec) -> Path:
    """Write a stage's resolved spec to `<run_dir>/<stage>/job.yaml`: what its ranks load."""
    path = stage.run_dir / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec.public_dump(), sort_keys=False))
    return path


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in: mappings key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
