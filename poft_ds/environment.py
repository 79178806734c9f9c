"""What a run ran with: software versions, the poft-ds commit, hosts and devices.

Global rank 0 writes `RUN_DIR/environment.json` when it starts (its own software and device)
and again after the first step, when every rank has written `ranks/rank<N>.json` with its own
software: the record then lists every rank's host and device and names any package whose
version differs between ranks (a node with another image is a classic cause of hangs and of
results that do not reproduce). Each checkpoint keeps a copy. A resumed run appends its launch;
earlier launches stay in the file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poft_ds import REPO_ROOT, __version__
from poft_ds.files import atomic_write

if TYPE_CHECKING:  # torch is imported where used: `poft-ds --version` should not wait for it
    import torch

ENVIRONMENT_FILE = "environment.json"

# The packages whose versions change what a run computes or how it communicates.
PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "tokenizers",
    "datasets",
    "accelerate",
    "huggingface-hub",
    "safetensors",
    "pydantic",
    "numpy",
    "pyarrow",
    "mpi4py",
    "flash-attn",
)


@functools.cache
def git_commit() -> str | None:
    """The poft-ds commit: `POFT_DS_GIT_COMMIT` (set in the Docker image), else the checkout's HEAD.

    A checkout with uncommitted changes gets a `-dirty` suffix; an installed wheel without the
    variable has no commit (None).
    """
    if os.environ.get("POFT_DS_GIT_COMMIT"):
        return os.environ["POFT_DS_GIT_COMMIT"]
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def version_string() -> str:
    """`poft-ds 0.1.0 (git 1a2b3c4d5e6f)`, as `poft-ds --version` prints it."""
    commit = git_commit()
    return f"poft-ds {__version__}" + (f" (git {commit[:12]}{'-dirty' * commit.endswith('-dirty')})" if commit else "")


@functools.cache
def software() -> dict[str, Any]:
    """This process's Python, platform, poft-ds version and commit, package versions and CUDA stack."""
    import torch

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    cuda = torch.cuda.is_available()
    return {
        "poft_ds": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
    }


def device_record(device: torch.device) -> dict[str, Any]:
    """The accelerator a rank computes on: name, memory and compute capability (or the CPU)."""
    import torch

    if device.type != "cuda":
        return {"device": str(device), "name": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": str(device),
        "name": props.name,
        "memory_bytes": props.total_memory,
        "capability": f"{props.major}.{props.minor}",
        "driver_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def write_environment(run_dir: str | Path, launch_started: float, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write (or update) this launch's entry in `RUN_DIR/environment.json` from global rank 0.

    Args:
        run_dir: The run directory.
        launch_started: When this launch's rank 0 started (unix time): identifies the launch's entry.
        models: Per role name, the model it loaded: `path`, and `hub_id` / `revision` for hub models.

    Returns:
        This launch's entry, as written.
    """
    run_dir = Path(run_dir)
    path = run_dir / ENVIRONMENT_FILE
    mine = software()
    ranks = []
    records = [f for f in (run_dir / "ranks").glob("rank*.json") if f.stem[4:].isdigit()]
    for f in sorted(records, key=lambda f: int(f.stem[4:])):
        try:
            # Every rank writes its record after the rendezvous with rank 0, so an older file is
            # an earlier launch's (a few seconds of slack for clocks of a shared file system).
            if f.stat().st_mtime < launch_started - 5:
                continue
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        ranks.append({k: rec.get(k) for k in ("global_rank", "host", "role", "device", "device_info", "software")})
    differs = sorted(
        {
            f"{key} on rank {r['global_rank']}: {other!r} (rank 0: {mine_value!r})"
            for r in ranks
            if r.get("software")
            for key, other, mine_value in _flat_differences(r["software"], mine)
        }
    )
    launch = {
        "started": launch_started,
        "written": time.time(),
        "software": mine,
        "hosts": sorted({r["host"] for r in ranks if r.get("host")} | {socket.gethostname()}),
        "models": models,
        "ranks": [{k: v for k, v in r.items() if k != "software"} for r in ranks],
        "software_differs": differs,
    }
    earlier: Any = []
    # A first launch, or an unreadable record: start it afresh rather than fail the run.
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        earlier = json.loads(path.read_text())["launches"]
    if not isinstance(earlier, list):
        earlier = []
    launches = [x for x in earlier if isinstance(x, dict) and x.get("started") != launch_started] + [launch]
    atomic_write(path, json.dumps({"launches": launches}, indent=1).encode())
    return launch


def _flat_differences(theirs: dict[str, Any], mine: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(theirs) | set(mine)):
        a, b = theirs.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [(f"{key}.{k}", x, y) for k, x, y in _flat_differences(a, b)]
        elif a != b and key != "platform":  # kernels differ between nodes harmlessly
            out.append((key, a, b))
    return out


def model_records(spec: Any) -> dict[str, dict[str, Any]]:
    """Per role name (`trainer`, `ref/<name>`), the model it loads: folder, and hub id and commit."""
    out = {"trainer": _model_record(spec.model)}
    for m in spec.aligned_models:
        out[f"ref/{m.name}"] = _model_record(m)
    return out


def _model_record(m: Any) -> dict[str, Any]:
    return {"path": m.path, "hub_id": m.hub_id, "revision": m.revision}
