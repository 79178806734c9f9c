"""Roles and process groups: which rank does what, and how the roles talk.

Every rank runs the same entry point. From the job spec and the launcher's global rank each
process derives its role:

    global ranks [0, T)                 trainer ranks (ZeRO-3 shards the target model)
    next aligned_models[0].ranks ranks  reference ranks serving aligned model 0
    next aligned_models[1].ranks ranks  reference ranks serving aligned model 1, ...

ZeRO-3 calls `dist.barrier()` on the *default* process group, so trainers and reference ranks
cannot share one default world (training deadlocks). Each role therefore gets its own default
world, opened on a prefix of one TCPStore hosted by global rank 0, and all ranks share a gloo
"bridge" group for the few floats per sample that cross roles (DESIGN.md section 3).
"""

from __future__ import annotations

import datetime
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from poft_ds.spec import JobSpec, SpecError, TimeoutsSpec


@dataclass(frozen=True)
class Role:
    """What one process does.

    Attributes:
        name: "trainer" or "ref/<aligned model name>"; also the role world's store prefix.
        kind: "trainer" or "reference".
        model_index: Index into `spec.aligned_models` for reference ranks, else None.
        first_global_rank: Global rank of this role's rank 0.
        size: Ranks in this role.
        rank: This process's rank inside the role.
    """

    name: str
    kind: str
    model_index: int | None
    first_global_rank: int
    size: int
    rank: int


def role_layout(spec: JobSpec) -> list[tuple[str, str, int | None, int, int]]:
    """All roles a job's launch starts as (name, kind, model_index, first_global_rank, size), in rank order.

    A store-only job (`JobSpec.store_only`) starts its trainers only.
    """
    layout = [("trainer", "trainer", None, 0, spec.trainer_ranks)] if spec.trainer_ranks else []
    start = spec.trainer_ranks
    if spec.reference_ranks:
        for k, m in enumerate(spec.aligned_models):
            layout.append((f"ref/{m.name}", "reference", k, start, m.ranks))
            start += m.ranks
    return layout


def role_of(spec: JobSpec, global_rank: int) -> Role:
    """The role of `global_rank` in a job."""
    for name, kind, k, first, size in role_layout(spec):
        if first <= global_rank < first + size:
            return Role(name, kind, k, first, size, global_rank - first)
    raise SpecError(f"global rank {global_rank} is outside the job's {spec.world_size} ranks (topology)")


@dataclass
class LaunchIdentity:
    """Who this process is, as the launcher told it."""

    global_rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host() -> str:
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def discover_identity(default_port: int = 29500) -> LaunchIdentity:
    """Find this process's global rank and the rendezvous address, whichever launcher started it.

    * deepspeed launcher, torchrun, `poft-ds launch`: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
      MASTER_PORT.
    * mpirun (OpenMPI, MPICH, Intel MPI): rank and size from mpi4py; the local rank from the ranks
      sharing this node; rank 0 broadcasts its host name as the master address.
    * srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the master is the job's first node.

    Args:
        default_port: The rendezvous port when the environment names none (`launcher.master_port`).
    """
    env = os.environ
    port = int(env.get("MASTER_PORT", default_port))
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
        if missing:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {missing} are not; start ranks with poft-ds launch")
        return LaunchIdentity(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), env["MASTER_ADDR"], port
        )
    if any(v in env for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        master = comm.bcast(env.get("MASTER_ADDR") or socket.gethostname(), root=0)
        return LaunchIdentity(comm.Get_rank(), comm.Get_size(), local.Get_rank(), master, port)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return LaunchIdentity(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", "0")),
            env.get("MASTER_ADDR") or _first_slurm_host(),
            port,
        )
    raise RuntimeError(
        "poft-ds train must be started by a launcher (poft-ds launch, torchrun, deepspeed, srun or mpirun); "
        "no rank information found in the environment"
    )


@dataclass
class Worlds:
    """The process groups of one rank.

    Attributes:
        role: This rank's role; its world is torch.distributed's default group.
        identity: The launcher's view of this rank.
        bridge: Gloo group over all global ranks, for scores and cross-role agreement.
        timeouts: How long each kind of wait may last (`timeouts` in the spec).
        device: The torch device this rank computes on.
    """

    role: Role
    identity: LaunchIdentity
    bridge: dist.ProcessGroup
    timeouts: TimeoutsSpec
    device: torch.device

    def bridge_barrier(self, what: str, timeout_s: float, field: str) -> None:
        """Wait for every rank of the job, or fail after the timeout."""
        _wait(self.bridge.barrier(), self, what, timeout_s, field)

    def bridge_allreduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum of a CPU tensor over every rank of the job (during start-up)."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        _wait(
            self.bridge.allreduce([t], opts),
            self,
            "every rank to finish preparing the data (validity mask)",
            self.timeouts.startup_s,
            "timeouts.startup_s",
        )
        return t

    def send(self, t: torch.Tensor, dst: int) -> dist.Work:
        """Start sending a CPU tensor to global rank `dst` over the bridge."""
        return self.bridge.send([t], dst, 0)

    def irecv(self, t: torch.Tensor, src: int) -> dist.Work:
        """Post a receive of a CPU tensor from global rank `src`; finish it with `wait_for`."""
        return self.bridge.recv([t], src, 0)


def _wait(work: dist.Work | Callable[[], dist.Work], worlds: Worlds, what: str, timeout_s: float, field: str) -> None:
    """Wait for a bridge operation; any failure (timeout, dead peer) names this rank and what it awaited.

    Args:
        work: The operation, or a function that starts it.
        worlds: This rank's groups (for the message).
        what: What is awaited, for the message.
        timeout_s: How long to wait.
        field: The spec field that sets `timeout_s`, for the message.
    """
    try:
        (work() if callable(work) else work).wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        lost = "closed" in str(e).lower() or "reset" in str(e).lower()
        raise RuntimeError(
            f"[rank {worlds.identity.global_rank} {worlds.role.name}] "
            + (f"lost the peer while waiting for {what}" if lost else f"gave up waiting for {what}")
            + f" (timeout {timeout_s:.0f}s, {field}): {e}"
        ) from e


def wait_for(work: dist.Work, worlds: Worlds, what: str, timeout_s: float, field: str) -> None:
    """Wait for a send (`Worlds.send`) to be received or a receive (`Worlds.irecv`) to arrive, or fail
    after the timeout naming `what`."""
    _wait(work, worlds, what, timeout_s, field)


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        # Several processes may share a GPU (a trainer and a reference rank on a one-GPU box).
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def bind_cpu_cores(local_rank: int, procs_per_node: int) -> list[int]:
    """Pin this process to its own share of the cores it may use (`topology.bind_cores`).

    Local rank r gets cores [r*t, (r+1)*t) of the allowed ones (wrapping around when the node is
    oversubscribed), t = OMP_NUM_THREADS, else the cores over `procs_per_node`; torch's intra-op
    threads follow (threads the process starts later, gloo's among them, inherit the cores).
    Without it the scheduler moves a single-threaded rank between cores and puts other ranks'
    threads on its core: in `poft-ds bench` on 2 cores, PoFT-online's trainer computed ~8% slower
    than SFT's unpinned and ~4% pinned.

    Returns:
        The cores this process now runs on.
    """
    cores = sorted(os.sched_getaffinity(0))
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, len(cores) // procs_per_node)
    threads = min(threads, len(cores))
    mine = [cores[(local_rank * threads + i) % len(cores)] for i in range(threads)]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(threads)
    return mine


def _skip_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce from being built and opened.

    It only serves tensor-parallel inference, which poft-ds does not use; building it JIT-compiles
    a C++ extension on first use, and its shared-memory segment is named after MASTER_ADDR/PORT,
    which every role world on a host shares.
    """
    # `deepspeed.comm.torch` as an attribute is the torch package (re-exported); take the module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_worlds(spec: JobSpec) -> Worlds:
    """Create this rank's role world (as the default group) and the bridge group.

    Also rewrites RANK / WORLD_SIZE / LOCAL_RANK in the environment to role-local values, which
    `deepspeed.zero.Init` requires.

    Raises:
        SpecError: when the launcher's world size does not match the spec's topology.
    """
    ident = discover_identity(spec.launcher.fixed_port)
    if ident.world_size != spec.world_size:
        raise SpecError(
            f"topology: the launcher started {ident.world_size} processes but the spec describes "
            f"{spec.world_size} (topology.nodes x topology.procs_per_node)"
        )
    role = role_of(spec, ident.global_rank)
    # Store look-ups happen during start-up; a collective inside a role may wait through a peer's
    # checkpoint or start-up, so the process groups get the longest wait; the bridge's individual
    # waits are bounded by what they wait for (`_wait`).
    startup = datetime.timedelta(seconds=spec.timeouts.startup_s)
    timeout = datetime.timedelta(seconds=spec.timeouts.longest)

    # torchrun's agent already hosts a TCPStore on MASTER_PORT; everyone joins it as a client.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        ident.master_addr,
        ident.master_port,
        world_size=None if agent_store else ident.world_size,
        is_master=ident.global_rank == 0 and not agent_store,
        timeout=startup,
        wait_for_workers=False,
    )
    run_prefix = f"poft/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    device = _device_for(ident.local_rank)
    if device.type == "cpu" and spec.topology.bind_cores:
        bind_cpu_cores(ident.local_rank, spec.launched_procs_per_node)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(
        RANK=str(role.rank),
        WORLD_SIZE=str(role.size),
        LOCAL_RANK=str(ident.local_rank),
        MASTER_ADDR=ident.master_addr,
        MASTER_PORT=str(ident.master_port),
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"{run_prefix}/role/{role.name}", store),
        rank=role.rank,
        world_size=role.size,
        timeout=timeout,
    )
    bridge = dist.ProcessGroupGloo(
        dist.PrefixStore(f"{run_prefix}/bridge", store), ident.global_rank, ident.world_size, timeout
    )
    if device.type == "cpu":
        _skip_deepspeed_shm_allreduce()
    # DeepSpeed adopts the role world as its own (it is already torch.distributed's default group).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return Worlds(role=role, identity=ident, bridge=bridge, timeouts=spec.timeouts, device=device)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume
EXIT_ORPHANED = 70  # EX_SOFTWARE: the launcher died under this rank
PREEMPTED_MARKER = "PREEMPTED"
_stop_requested = False


class Preempted(Exception):
    """The job was asked to stop (SIGTERM / SIGUSR1) and has written a checkpoint."""


def _request_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True
    print(f"[poft-ds] received signal {signum}: stopping after the current step", flush=True)


def start_orphan_watchdog(interval_s: float = 2.0) -> None:
    """Exit this rank when its launcher dies (SIGKILL, OOM killer): no orphaned rank keeps a GPU.

    The launcher (torchrun's agent, DeepSpeed's launch.py, slurmstepd, the MPI daemon) is this
    process's parent; when it dies the rank is re-parented, which a daemon thread notices.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print(f"[poft-ds] launcher (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="poft-orphan-watchdog", daemon=True).start()


def install_preemption_handlers() -> None:
    """SIGTERM and SIGUSR1 (Slurm's --signal) ask for a checkpoint and a clean stop."""
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGUSR1, _request_stop)


def local_stop_requested() -> bool:
    return _stop_requested


def bridge_broadcast_int(worlds: Worlds, value: int) -> int:
    """Global rank 0's value of an integer, on every rank of the job."""
    t = torch.tensor([value], dtype=torch.long)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    _wait(
        worlds.bridge.broadcast([t], opts),
        worlds,
        "global rank 0's decision",
        worlds.timeouts.startup_s,
        "timeouts.startup_s",
    )
    return int(t.item())


def shutdown(worlds: Worlds) -> None:
    """Leave in step with every rank (so the store host outlives its clients) and free the groups.

    Reference ranks get here while the trainers still finish their last steps, checkpoint and
    export the final model.
    """
    t = worlds.timeouts
    worlds.bridge_barrier(
        "every rank to finish (trainers: last steps, checkpoint, final model)",
        t.step_s + 2 * t.checkpoint_s,
        "timeouts.step_s + 2 x timeouts.checkpoint_s",
    )
    dist.destroy_process_group()


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this rank has held: device memory on a GPU, resident host memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def process_start_time() -> float:
    """When this process started (seconds since the epoch), for time-to-first-step."""
    import psutil

    return psutil.Process().create_time()
