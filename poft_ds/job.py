"""The one entry point every rank runs.

`run_rank(spec)` opens the role worlds, prepares the data under this role's model
(`poft_ds.data.prepare`), agrees with every other rank on the step to start from, and hands over
to the trainer recipe (`poft_ds.train`) or the reference loop (`poft_ds.reference`). Nothing
imports this module back.
"""

from __future__ import annotations

import os
import warnings
from typing import TextIO

import torch

from poft_ds.checkpoint import agree_on_resume_step, checkpoint_root
from poft_ds.data.chat import load_tokenizer
from poft_ds.data.prepare import model_of_role, prepare_data
from poft_ds.distributed import init_worlds, install_preemption_handlers, shutdown, start_orphan_watchdog
from poft_ds.spec import JobSpec


def run_rank(spec: JobSpec, offline_scoring: bool = False) -> None:
    """Run this process's part of a job, whatever its role.

    Args:
        spec: The job.
        offline_scoring: Run `poft-ds score` (reference ranks fill the score store) instead of training.
    """
    install_preemption_handlers()
    start_orphan_watchdog()
    worlds = init_worlds(spec)
    _show_each_warning_once(worlds.identity.global_rank)
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(model_of_role(spec, worlds))
    data = prepare_data(spec, worlds, tokenizer)
    start = 0 if offline_scoring else agree_on_resume_step(spec, worlds, data)
    if worlds.role.kind == "trainer":
        from poft_ds.train import train

        train(spec, worlds, data, tokenizer, checkpoint_root(spec) / f"step_{start:08d}" if start else None)
    elif offline_scoring:
        from poft_ds.reference import score_dataset

        score_dataset(spec, worlds, data, tokenizer)
    else:
        from poft_ds.reference import serve_scores

        serve_scores(spec, worlds, data, tokenizer, start)
    shutdown(worlds)


def _show_each_warning_once(global_rank: int) -> None:
    """Let each distinct warning reach the console once per run, from global rank 0.

    Python shows a warning once per code location, but any library that enters
    `warnings.catch_warnings()` wipes that memory, so torch's deprecation warnings came back at
    every step from every rank. Each warning (category and text) is now shown at most once per
    process, by global rank 0 only, except poft-ds's own, which every rank shows.
    """
    seen: set[tuple[type[Warning], str]] = set()
    show = warnings.showwarning

    def once(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        key = (category, str(message))
        if key not in seen:
            seen.add(key)
            if global_rank == 0 or f"{os.sep}poft_ds{os.sep}" in filename:
                show(message, category, filename, lineno, file, line)

    warnings.showwarning = once
