"""Metrics logging: metrics.jsonl, TensorBoard and W&B (offline) get what the trainer logs."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

import poft_ds.spec
from poft_ds.loggers import MetricsLogger, tracker_scalars
from poft_ds.spec import LoggingSpec, SpecError, load_spec
from tests.conftest import base_spec, write_spec

NAN = float("nan")

# What the trainer logs, with the awkward cases: a NaN loss, a None grad_norm, a skipped step, eval
# metrics on some steps only, per-model keys that already hold a '/'.
RECORDS: list[dict[str, Any]] = [
    {"step": 1, "epoch": 0, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.25, "s_ref/zephyr": -3.0, "tokens": 640},
    {"step": 2, "epoch": 0, "loss": NAN, "lr": 2e-4, "grad_norm": None, "s_ref/zephyr": -2.5, "step_skipped": True},
    {
        "step": 3,
        "epoch": 1,
        "loss": 1.5,
        "lr": 3e-4,
        "grad_norm": 0.75,
        "eval_cross_entropy": 4.0,
        "eval_s_target": -4.0,
    },
]


@pytest.fixture
def isolated_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No WANDB_* settings from the caller's shell (so W&B runs offline), and every file W&B writes
    outside the run directory (settings, caches, debug logs) kept under tmp_path."""
    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    yield
    if "wandb" in sys.modules:  # a failed test must not leave W&B's service process behind either
        sys.modules["wandb"].teardown()


def _children() -> set[int]:
    """Process ids of this process's children (Linux)."""
    return {
        int(pid)
        for task in Path(f"/proc/{os.getpid()}/task").iterdir()
        for pid in (task / "children").read_text().split()
    }


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one tag, read back with TensorBoard's own reader."""
    events = EventAccumulator(str(run_dir / "tensorboard" / run_dir.name))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir / "tensorboard" / run_dir.name))
    events.Reload()
    return set(events.Tags()["scalars"])


def _wandb_history(path: Path) -> list[dict[str, Any]]:
    """The logged rows of an offline W&B run file, W&B's bookkeeping keys (`_timestamp`, ...) left out
    but `_step`.

    The file is a LevelDB-style log (after a 7-byte `:W&B` header: 32 KiB blocks of chunks, each a
    7-byte header of CRC, length and type, then the bytes) of protobuf `Record`s. wandb 0.31 has no
    Python reader of its own any more.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                rows.append({k: v for k, v in items.items() if k == "_step" or not k.startswith("_")})
    return rows


def _nan_as_text(record: dict[str, Any]) -> dict[str, Any]:
    # NaN != NaN, so compare records with it spelled out.
    return {k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def test_tracker_tags_follow_the_hf_trainer() -> None:
    assert tracker_scalars(RECORDS[1]) == {"train/epoch": 0.0, "train/lr": 2e-4, "train/s_ref/zephyr": -2.5}
    assert tracker_scalars(RECORDS[2]) == {
        "train/epoch": 1.0,
        "train/loss": 1.5,
        "train/lr": 3e-4,
        "train/grad_norm": 0.75,
        "eval/cross_entropy": 4.0,
        "eval/s_target": -4.0,
    }
    assert tracker_scalars({"step": 4, "loss": float("inf"), "note": "text"}) == {}


def test_tensorboard_wandb_and_jsonl_get_the_records(
    tmp_path: Path, isolated_wandb: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run-a"
    spec = LoggingSpec(report_to=["tensorboard", "wandb"])
    before = _children()
    with MetricsLogger(run_dir, spec, config={"seed": 7}) as logger:
        for rec in RECORDS:
            logger.log(rec)
    assert _children() == before, "W&B's service process outlived close()"

    # (a) TensorBoard: the test's values at the test's steps; NaN and None left out; eval under eval/.
    assert _scalars(run_dir, "train/loss") == [(1, 2.5), (3, 1.5)]
    assert _scalars(run_dir, "train/grad_norm") == [(1, 1.25), (3, 0.75)]
    assert _scalars(run_dir, "train/s_ref/zephyr") == [(1, -3.0), (2, -2.5)]
    assert _scalars(run_dir, "eval/cross_entropy") == [(3, 4.0)]
    assert _scalars(run_dir, "eval/s_target") == [(3, -4.0)]
    assert _tags(run_dir) == {
        "train/epoch",
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/s_ref/zephyr",
        "train/tokens",
        "eval/cross_entropy",
        "eval/s_target",
    }

    # (b) W&B: an offline run under RUN_DIR/wandb named by the id kept in RUN_DIR/wandb_run_id.
    run_id = (run_dir / "wandb_run_id").read_text()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in offline] == [run_id]
    assert _wandb_history(offline[0] / f"run-{run_id}.wandb") == [
        {"_step": 1, "train/epoch": 0, "train/loss": 2.5, "train/lr": 1e-4, "train/grad_norm": 1.25}
        | {"train/s_ref/zephyr": -3.0, "train/tokens": 640},
        {"_step": 2, "train/epoch": 0, "train/lr": 2e-4, "train/s_ref/zephyr": -2.5},
        {"_step": 3, "train/epoch": 1, "train/loss": 1.5, "train/lr": 3e-4, "train/grad_norm": 0.75}
        | {"eval/cross_entropy": 4.0, "eval/s_target": -4.0},
    ]
    assert f"wandb sync {offline[0]}" in capsys.readouterr().out
    assert not (tmp_path / "home").exists() or not any(p.suffix == ".wandb" for p in (tmp_path / "home").rglob("*"))

    # (c) metrics.jsonl: every record, as given.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [_nan_as_text(json.loads(line)) for line in lines] == [_nan_as_text(r) for r in RECORDS]

    # A resumed job continues the same W&B run (a second offline folder with the same id) and appends.
    with MetricsLogger(run_dir, spec, config={"seed": 7}, resume_step=3) as logger:
        logger.log({"step": 4, "loss": 1.0})
    assert _children() == before
    assert (run_dir / "wandb_run_id").read_text() == run_id
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[1] for p in offline} == {run_id}
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 4, "loss": 1.0}


def test_resumed_tensorboard_log_drops_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-b"
    spec = LoggingSpec(report_to=["tensorboard"])
    with MetricsLogger(run_dir, spec, config={}) as logger:
        for step in range(1, 7):
            logger.log({"step": step, "loss": float(step)})
    # The job died after step 6 and resumes from the checkpoint at step 3: steps 4 and 5 come again.
    with MetricsLogger(run_dir, spec, config={}, resume_step=3) as logger:
        logger.log({"step": 4, "loss": 40.0})
        logger.log({"step": 5, "loss": 50.0})
    assert _scalars(run_dir, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_logger_without_trackers_writes_only_jsonl_and_closes_twice(tmp_path: Path) -> None:
    run_dir = tmp_path / "deep" / "run-c"
    logger = MetricsLogger(run_dir, LoggingSpec(), config={})
    logger.log({"step": 1, "loss": 2.0})
    logger.close()
    logger.close()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert json.loads((run_dir / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    with pytest.raises(RuntimeError, match="after close"):
        logger.log({"step": 2, "loss": 1.0})


def test_record_without_integer_step_is_refused(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run", LoggingSpec(), config={}) as logger, pytest.raises(ValueError, match="'step'"):
        logger.log({"loss": 1.0})
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_corrupt_wandb_run_id_file_is_named(tmp_path: Path, isolated_wandb: None) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_run_id").write_text("../not an id\n")
    with pytest.raises(ValueError, match="wandb_run_id"):
        MetricsLogger(run_dir, LoggingSpec(report_to=["wandb"]), config={})
    assert not (run_dir / "wandb").exists()


def test_report_to_validates_when_installed() -> None:
    assert LoggingSpec(report_to=["tensorboard", "wandb"]).report_to == ["tensorboard", "wandb"]
    assert LoggingSpec().report_to == []


def test_report_to_with_a_missing_package_names_the_field_and_the_fix(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = poft_ds.spec.find_spec
    monkeypatch.setattr(poft_ds.spec, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    spec = base_spec(assets, tmp_path / "r", logging={"report_to": ["tensorboard", "wandb"], "run_name": "../x"})
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(spec, tmp_path / "job.yaml"))
    lines = str(err.value).splitlines()
    assert any("logging.report_to" in line and "pip install wandb" in line for line in lines), lines
    assert not any("tensorboard" in line for line in lines), lines
    assert any("logging.run_name" in line for line in lines), lines
