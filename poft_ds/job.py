"""The one entry point every rank runs.

`run_rank(spec)` opens the role worlds, sends the rank's output to its log file, keeps its
heartbeat file fresh (`poft-ds status`), prepares the data under this role's model
(`poft_ds.data.prepare`), agrees with every other rank on the step to start from, and hands over
to the trainer recipe (`poft_ds.train`) or the reference loop (`poft_ds.reference`). Nothing
imports this module back.
"""

from __future__ import annotations

import socket

import torch

from poft_ds.checkpoint import agree_on_resume_step, checkpoint_root
from poft_ds.data.chat import load_tokenizer
from poft_ds.data.prepare import model_of_role, prepare_data
from poft_ds.distributed import (
    Preempted,
    init_worlds,
    install_preemption_handlers,
    local_stop_requested,
    process_start_time,
    shutdown,
    start_orphan_watchdog,
)
from poft_ds.environment import model_records, write_environment
from poft_ds.rank_logs import route_rank_output
from poft_ds.spec import JobSpec
from poft_ds.status import Heartbeat


def run_rank(spec: JobSpec, offline_scoring: bool = False) -> None:
    """Run this process's part of a job, whatever its role.

    Args:
        spec: The job.
        offline_scoring: Run `poft-ds score` (reference ranks fill the score store) instead of training.
    """
    install_preemption_handlers()
    start_orphan_watchdog()
    worlds = init_worlds(spec)
    ident, role = worlds.identity, worlds.role
    route_rank_output(spec.run_dir, ident.global_rank)
    print(
        f"[poft-ds] host={socket.gethostname()} global_rank={ident.global_rank}/{ident.world_size} "
        f"role={role.name} role_rank={role.rank}/{role.size} local_rank={ident.local_rank} device={worlds.device}",
        flush=True,
    )
    if ident.global_rank == 0:  # completed with every rank's host and device after the first step
        write_environment(spec.run_dir, process_start_time(), model_records(spec))
    model = spec.aligned_models[role.model_index].name if role.kind == "reference" else None
    heartbeat = Heartbeat(
        spec.run_dir, ident.global_rank, ident.world_size, role.kind, role.rank, model, spec.logging.heartbeat_s
    )
    heartbeat.start()
    try:
        torch.manual_seed(spec.seed)
        tokenizer = load_tokenizer(model_of_role(spec, worlds))
        data = prepare_data(spec, worlds, tokenizer)
        start = 0 if offline_scoring else agree_on_resume_step(spec, worlds, data)
        heartbeat.update(state="running", step=start, total_steps=data.schedule.total_steps)
        if role.kind == "trainer":
            from poft_ds.train import train

            resume_from = checkpoint_root(spec) / f"step_{start:08d}" if start else None
            train(spec, worlds, data, tokenizer, resume_from, heartbeat)
        elif offline_scoring:
            from poft_ds.reference import score_dataset

            score_dataset(spec, worlds, data, tokenizer)
        else:
            from poft_ds.reference import serve_scores

            serve_scores(spec, worlds, data, tokenizer, start, heartbeat)
        shutdown(worlds)
    except Preempted:
        heartbeat.stop("preempted")
        raise
    except BaseException as e:
        if local_stop_requested():
            # Asked to stop (SIGTERM/SIGUSR1): a reference rank whose trainers checkpointed and
            # left loses its peers; that is the preemption, not a failure.
            heartbeat.stop("preempted", f"{type(e).__name__}: {e}")
            raise Preempted(-1) from e
        heartbeat.stop("failed", f"{type(e).__name__}: {e}")
        raise
    heartbeat.stop("finished")
