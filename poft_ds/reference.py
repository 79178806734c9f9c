"""Reference ranks: score every sample with one frozen aligned model and feed the trainers.

The ranks serving one aligned model share a ZeRO-3 inference engine (parameters sharded over
them). For each optimizer step, rank j of the group scores the positions `p % ranks == j` of the
step's global batch, in batches of similar length to cut padding, and sends each trainer the scores of the
positions that trainer consumes. Sends are asynchronous; a rank runs at most
`reference.prefetch_steps` steps ahead of the slowest trainer, then waits (with a timeout).
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
from transformers import PreTrainedTokenizerBase

from poft_ds.data import collate, pad_token_id
from poft_ds.distributed import Worlds, wait_send
from poft_ds.ds_config import reference_config, resolve_precision
from poft_ds.job import PreparedData
from poft_ds.models import inference_engine, load_scorer
from poft_ds.schedule import length_grouped_batches, reference_positions, shared_positions
from poft_ds.spec import JobSpec


def serve_scores(spec: JobSpec, worlds: Worlds, data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> None:
    """Score every step's samples for this rank's aligned model and send them to the trainers."""
    role = worlds.role
    model = spec.aligned_models[role.model_index]
    precision = resolve_precision(spec, worlds.device)
    ds_config = reference_config(spec, precision)
    engine = inference_engine(load_scorer(model, ds_config, precision), ds_config)
    pad = pad_token_id(tokenizer)
    schedule = data.schedule
    G, bs = schedule.global_batch, model.score_batch_size
    # Every rank of a ZeRO-3 group must run the same number of forward passes (each one gathers
    # the sharded parameters collectively), so ranks with fewer samples run empty passes.
    passes_per_step = math.ceil(math.ceil(G / role.size) / bs)
    dummy = collate([data.samples[schedule.usable[0]]], pad)
    dummy.response_mask.zero_()

    pending: deque[tuple[int, int, torch.Tensor, object]] = deque()
    forward_passes = scored = 0
    busy = 0.0
    for step in range(schedule.total_steps):
        rows = schedule.global_batch_at(step)
        lengths = {p: len(data.samples[rows[p]].input_ids) for p in reference_positions(G, role.size, role.rank)}
        batches = length_grouped_batches(list(lengths), lengths.__getitem__, bs)
        scores: dict[int, float] = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(passes_per_step):
                chunk = batches[i] if i < len(batches) else []
                batch = (collate([data.samples[rows[p]] for p in chunk], pad) if chunk else dummy).to(worlds.device)
                logp_sum, n_tokens = engine(batch.input_ids, batch.attention_mask, batch.response_mask)
                if chunk:
                    forward_passes += 1
                    scored += len(chunk)
                    values = (logp_sum / n_tokens).float().cpu().tolist()
                    scores.update(zip(chunk, values))
        busy += time.perf_counter() - t0

        for trainer in range(spec.trainer_ranks):
            shared = shared_positions(schedule, trainer, role.size, role.rank)
            if shared:
                t = torch.tensor([scores[p] for p in shared], dtype=torch.float32)
                # Trainers are global ranks [0, trainer_ranks); keep the buffer alive until sent.
                pending.append((step, trainer, t, worlds.send(t, trainer)))
        while pending and pending[0][0] <= step - spec.reference.prefetch_steps:
            _, trainer, _, work = pending.popleft()
            wait_send(work, worlds, f"trainer rank {trainer} to take {model.name}'s scores")
    while pending:
        _, trainer, _, work = pending.popleft()
        wait_send(work, worlds, f"trainer rank {trainer} to take {model.name}'s scores")
    print(
        f"[poft-ds] {role.name} rank {role.rank}: scored {scored} samples in {forward_passes} forward passes, "
        f"{busy:.1f}s busy",
        flush=True,
    )
