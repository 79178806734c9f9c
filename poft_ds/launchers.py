"""Turning a job spec into a launch: local (torchrun), deepspeed, Slurm (sbatch) or MPI (mpirun).

Every launcher starts the same entry point (`python -m poft_ds.cli train job.yaml`) on every
rank; the ranks find their identity in what the launcher sets (`poft_ds.distributed`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import psutil

from poft_ds import SHIPPED_ROOT
from poft_ds.distributed import EXIT_PREEMPTED, PREEMPTED_MARKER
from poft_ds.spec import JobSpec, SpecError

SBATCH_TEMPLATE = SHIPPED_ROOT / "launch" / "slurm.sbatch.j2"


@dataclass
class Launch:
    """What `poft-ds launch` runs: a command, plus files it writes first."""

    command: list[str]
    files: dict[Path, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _entry(spec_path: Path, command: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["-m", "poft_ds.cli", command, str(spec_path), *extra]


def _launch_dir(spec: JobSpec) -> Path:
    return Path(spec.run_dir) / "launch"


def render_hostfile(spec: JobSpec) -> str:
    """A DeepSpeed hostfile: one line per node with its process slots."""
    return "".join(f"{h} slots={spec.launched_procs_per_node}\n" for h in spec.launcher.deepspeed.hosts)


def render_sbatch(spec: JobSpec, spec_path: Path, command: str = "train", extra: tuple[str, ...] = ()) -> str:
    """The sbatch script for a job, from launch/slurm.sbatch.j2."""
    s = spec.launcher.slurm
    template = jinja2.Template(
        SBATCH_TEMPLATE.read_text(), keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    return template.render(
        job_name=s.job_name or Path(spec.run_dir).name,
        nodes=spec.topology.nodes,
        procs_per_node=spec.launched_procs_per_node,
        log_dir=str(Path(spec.run_dir) / "slurm"),
        partition=s.partition,
        account=s.account,
        time=s.time,
        gres=s.gres,
        overcommit=s.overcommit,
        extra_sbatch=s.extra_sbatch,
        srun_args=s.srun_args,
        signal_seconds=s.signal_seconds,
        run_dir=spec.run_dir,
        master_port=spec.launcher.fixed_port,
        python=sys.executable,
        spec_path=str(spec_path),
        command=command,
        extra=extra,
    )


def plan_launch(
    spec: JobSpec, spec_path: str | os.PathLike[str], command: str = "train", extra: tuple[str, ...] = ()
) -> Launch:
    """The command (and files) that start every rank of a job.

    Args:
        spec: The validated job spec.
        spec_path: Its YAML file; every rank re-reads it.
        command: The rank entry point: `train`, or `score-worker` for offline scoring.
        extra: Further arguments for every rank (e.g. `--resume`).
    """
    spec_path = Path(spec_path).resolve()
    lau = spec.launcher
    topo = spec.topology
    if lau.kind == "local":
        return Launch(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={spec.launched_procs_per_node}",
                f"--master-addr={lau.master_addr or '127.0.0.1'}",
                f"--master-port={lau.master_port or free_port(lau.master_addr or '127.0.0.1')}",
                *_entry(spec_path, command, extra),
            ]
        )
    if lau.kind == "deepspeed":
        d = lau.deepspeed
        files = {}
        if topo.nodes == 1 and not (d.hosts or d.hostfile):
            # One node: the launcher starts the processes itself, with no hostfile and no ssh.
            where = [
                "--num_nodes=1",
                f"--num_gpus={spec.launched_procs_per_node}",
                f"--master_addr={lau.master_addr or '127.0.0.1'}",
            ]
        else:
            hostfile = Path(d.hostfile) if d.hostfile else _launch_dir(spec) / "hostfile"
            if not d.hostfile:
                files[hostfile] = render_hostfile(spec)
            first_host = d.hosts[0] if d.hosts else _first_host_in(hostfile)
            where = [
                f"--hostfile={hostfile}",
                f"--master_addr={lau.master_addr or first_host}",
                f"--launcher={d.backend}",
            ]
            if d.ssh_port:
                where.append(f"--ssh_port={d.ssh_port}")
            if d.launcher_args:
                where.append(f"--launcher_args={d.launcher_args}")
        # The runner as a module of this interpreter: the `deepspeed` script need not be on PATH.
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *where]
        cmd += [f"--master_port={lau.fixed_port}", "--no_local_rank", "--module"]
        return Launch([*cmd, *_entry(spec_path, command, extra)[1:]], files)
    if lau.kind == "slurm":
        script = _launch_dir(spec) / "job.sbatch"
        return Launch(["sbatch", "--parsable", str(script)], {script: render_sbatch(spec, spec_path, command, extra)})
    if lau.kind == "mpi":
        m = lau.mpi
        cmd = [m.mpirun, "-np", str(spec.world_size)]
        if m.hostfile:
            cmd += ["--hostfile", m.hostfile]
        cmd += list(m.args)
        # mpirun forwards only the variables it is told to; these make the ranks' runs match this one.
        env = {
            "MASTER_PORT": str(lau.fixed_port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        if lau.master_addr:
            env["MASTER_ADDR"] = lau.master_addr
        for name in [*env, "PATH", "PYTHONPATH", "DS_ACCELERATOR"]:
            if name in env or name in os.environ:
                cmd += ["-x", name]
        return Launch([*cmd, sys.executable, *_entry(spec_path, command, extra)], env=env)
    raise SpecError(f"launcher.kind: unknown launcher {lau.kind!r}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out and released on `host`: free now, and a different one per launch,
    so a launch's rendezvous never meets another job's or a lingering socket of the launch before it."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first_host_in(hostfile: Path) -> str:
    for line in hostfile.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            return line.split()[0]
    raise SpecError(f"launcher.deepspeed.hostfile: {hostfile} names no host")


def _run_forwarding_preemption(command: list[str], env: dict[str, str]) -> int:
    """Run a launcher; a SIGTERM or SIGUSR1 sent to this process asks the job's ranks to stop.

    `docker stop`, Kubernetes and schedulers signal the main process only. Left alone, SIGTERM
    would kill this process and orphan the ranks (which then exit without a checkpoint), and
    torchrun, when signalled itself, kills its ranks 30 s later, mid-checkpoint for a large model.
    So the signal goes to the ranks as SIGUSR1: they finish the step, checkpoint and exit with
    code 75, and the launcher then ends by itself.
    """
    proc = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: object) -> None:
        ranks = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "poft_ds.cli" in " ".join(_cmdline(p)) and p.pid != proc.pid
        ]
        for p in ranks or [psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGUSR1)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def run_launch(spec: JobSpec, plan: Launch) -> int:
    """Write the plan's files and run its command; for Slurm, print the job id and log location.

    Returns:
        The launcher's exit code (for Slurm: sbatch's).
    """
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = dict(os.environ, **spec.env, **plan.env)
    env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")  # when not started by the CLI
    tool = plan.command[0]
    if not Path(tool).is_absolute() and shutil.which(tool, path=env.get("PATH")) is None:
        raise SpecError(f"launcher.kind: {tool!r} is not on PATH")
    if spec.launcher.kind != "slurm":
        # A marker left by an earlier preempted launch; this launch resumes from its checkpoint.
        (Path(spec.run_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
        code = _run_forwarding_preemption(plan.command, env)
        if code == 0:
            return code
        state, reason = _final_state(Path(spec.run_dir))
        if state == "preempted":
            # The trainers checkpointed and stopped on request; torchrun reports any non-zero
            # rank as its own exit 1, so say what happened with the code a rank would use.
            print("[poft-ds] the job was preempted after a checkpoint; launch it again to resume", flush=True)
            return EXIT_PREEMPTED
        print(
            f"[poft-ds] the job failed (exit {code}); {role_map(spec)}. {reason}",
            file=sys.stderr,
            flush=True,
        )
        return code
    (Path(spec.run_dir) / "slurm").mkdir(parents=True, exist_ok=True)  # Slurm does not create it
    proc = subprocess.run(plan.command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr, end="")
        return proc.returncode
    job_id = re.split(r"[;\s]", proc.stdout.strip())[0]
    print(f"[poft-ds] submitted Slurm job {job_id}; logs: {Path(spec.run_dir) / 'slurm'}/*-{job_id}.out")
    print(job_id)
    return 0


def _final_state(run_dir: Path) -> tuple[str, str]:
    """Whether a local launch was preempted or failed, and why, once every rank of a local launch has exited.

    A rank that died without a word (SIGKILL, the OOM killer) leaves a "running" heartbeat, so
    with every process gone any live heartbeat is a death. The PREEMPTED marker alone does not
    make a preemption: when one rank crashes, torchrun SIGTERMs the others, and they checkpoint
    and write the marker as if asked to stop; the crashed rank's heartbeat tells them apart.
    """
    from poft_ds.status import run_status

    try:
        status = run_status(run_dir, stale_after_s=0.0)
    except (OSError, ValueError) as e:
        status = {"state": "unknown", "reason": f"heartbeats unreadable: {e}"}
    marker = (run_dir / PREEMPTED_MARKER).is_file()
    if status["state"] == "preempted" or (status["state"] == "unknown" and marker):
        return "preempted", status["reason"]
    if status["state"] == "failed":
        return "failed", f"Heartbeats: {status['reason']}."
    return "failed", "The report above names the rank that failed first."


def role_map(spec: JobSpec) -> str:
    """'global ranks 0-1: trainer, 2: ref/zephyr' for error messages."""
    from poft_ds.distributed import role_layout

    parts = []
    for name, _, _, first, size in role_layout(spec):
        ranks = str(first) if size == 1 else f"{first}-{first + size - 1}"
        parts.append(f"{ranks}: {name}")
    return "global ranks " + ", ".join(parts)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
