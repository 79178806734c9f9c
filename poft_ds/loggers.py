"""Where rank 0's per-step metrics go: RUN_DIR/metrics.jsonl always, TensorBoard and W&B on request.

TensorBoard and W&B are optional packages, imported only when `logging.report_to` names them, so
poft-ds runs without either installed. Tags follow the Hugging Face Trainer (`train/loss`,
`eval/cross_entropy`), so dashboards built for HF runs read poft-ds runs too.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from poft_ds.files import atomic_write
from poft_ds.spec import LoggingSpec

if TYPE_CHECKING:  # both optional: imported at run time only when report_to names them
    import wandb
    from torch.utils.tensorboard import SummaryWriter

WANDB_RUN_ID_FILE = "wandb_run_id"


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers under Hugging Face Trainer tags.

    `eval_x` becomes `eval/x`, every other key `train/<key>` (a `/` in the key stays, so
    `s_ref/zephyr` becomes `train/s_ref/zephyr`). `step` is the x axis, not a metric; None, NaN,
    infinities and booleans (`step_skipped`) are left out because a tracker cannot plot them.
    """
    scalars = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        tag = "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key
        scalars[tag] = float(value)
    return scalars


class MetricsLogger:
    """Writes each logged step to metrics.jsonl and to the trackers in `logging.report_to`.

    Rank 0 only. Use as a context manager (or call `close()`) so W&B's background service stops.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], logging_spec: LoggingSpec, config: dict[str, Any], resume_step: int = 0
    ) -> None:
        """Open metrics.jsonl for appending and start the requested trackers.

        Args:
            run_dir: The run directory (created if missing).
            logging_spec: The spec's `logging` section: `report_to` and `run_name`.
            config: The resolved job spec, recorded as the W&B run's config.
            resume_step: The checkpoint step a resumed run restarts from (0: a fresh run). TensorBoard
                hides its events past this step, as metrics.jsonl drops its lines past it.
        """
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        name = logging_spec.run_name or run_dir.name
        self._closed = False
        self._tensorboard: SummaryWriter | None = None
        self._wandb: wandb.Run | None = None
        # Kept open across log() calls until close(), so no `with` block.
        self._metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        try:
            if "tensorboard" in logging_spec.report_to:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step makes readers drop the events a previous attempt logged at or after it.
                self._tensorboard = SummaryWriter(
                    log_dir=str(run_dir / "tensorboard" / name), purge_step=resume_step + 1 if resume_step else None
                )
            if "wandb" in logging_spec.report_to:
                import wandb

                self._wandb = wandb.init(
                    # Entity comes from WANDB_ENTITY inside wandb itself, as with the HF Trainer.
                    project=os.environ.get("WANDB_PROJECT") or "poft-ds",
                    name=name,
                    # An explicit dir would override WANDB_DIR, so honour it here.
                    dir=os.environ.get("WANDB_DIR") or str(run_dir),
                    config=config,
                    id=_wandb_run_id(run_dir),
                    resume="allow",
                    # Offline by default: compute nodes often have no network, and a W&B outage must not
                    # stop training; `wandb sync` uploads afterwards.
                    mode=os.environ.get("WANDB_MODE", "offline"),
                    settings=wandb.Settings(silent=True, console="off"),
                )
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl and send its finite numbers to the trackers.

        Args:
            record: One optimizer step's metrics; `step` (int, 1-based) is the x axis.

        Raises:
            ValueError: if the record has no integer `step`.
        """
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"a metrics record needs an integer 'step', got {step!r} in {record}")
        if self._closed:
            raise RuntimeError("MetricsLogger.log() after close()")
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = tracker_scalars(record)
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
            # Flushed per step like metrics.jsonl, so a killed job's dashboards reach its last step.
            self._tensorboard.flush()
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every output; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._metrics.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
        finally:
            if self._wandb is not None:
                import wandb

                offline, sync_dir = self._wandb.offline, self._wandb.settings.sync_dir
                self._wandb.finish()
                # finish() leaves wandb's service process running until interpreter exit; teardown stops
                # it. Rank 0 owns the only run in this process, so nothing else loses it.
                wandb.teardown()
                if offline:
                    print(f"[poft-ds] W&B run saved offline; upload it with: wandb sync {sync_dir}", flush=True)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _wandb_run_id(run_dir: Path) -> str:
    """The W&B run id kept in RUN_DIR/wandb_run_id, created on first use: a resumed job continues the same run."""
    path = run_dir / WANDB_RUN_ID_FILE
    if not path.exists():
        atomic_write(path, secrets.token_hex(6).encode())
    run_id = path.read_text().strip()
    if not re.fullmatch(r"[a-z0-9]+", run_id):
        raise ValueError(f"{path}: expected a W&B run id (lowercase letters and digits), got {run_id!r}")
    return run_id
