"""Reference ranks: score samples with one frozen aligned model, online or offline.

The ranks serving one aligned model share a ZeRO-3 inference engine (parameters sharded over
them). Scores already in the score store are never computed again; new ones are written back.

Online (`serve_scores`), for each optimizer step rank j of the group scores the positions
`p % ranks == j` of the step's global batch, in batches of similar length to cut padding, and
sends each trainer the scores of the positions that trainer consumes. Sends are asynchronous; a
rank runs at most `reference.prefetch_steps` steps ahead of the slowest trainer, then waits (with
a timeout). Offline (`score_dataset`, `poft-ds score`), the group scores every usable sample
into the store, resuming where an earlier, interrupted run stopped.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from poft_ds.data.batch import collate, empty_pass, pack, pad_token_id
from poft_ds.data.prepare import PreparedData, unit_rows
from poft_ds.data.schedule import length_grouped_batches, pack_positions, reference_positions, shared_positions
from poft_ds.distributed import Worlds, local_stop_requested, wait_for
from poft_ds.ds_config import reference_config, resolve_precision
from poft_ds.models import inference_engine, load_scorer, verify_head, write_rank_record, write_rank_summary
from poft_ds.score_store import ScoreStore, model_fingerprint, scorer_id
from poft_ds.spec import JobSpec
from poft_ds.status import Heartbeat


class GroupScorer:
    """One aligned model on one reference rank: the ZeRO-3 engine plus the store's scores."""

    def __init__(self, spec: JobSpec, worlds: Worlds, data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> None:
        self.worlds = worlds
        self.data = data
        self.model = spec.aligned_models[worlds.role.model_index]
        precision = resolve_precision(spec, worlds.device)
        self.store = None
        self.known: dict[str, tuple[float, int]] = {}
        if spec.score_store.enabled:
            root = spec.score_store.resolved_dir(spec.run_dir)
            fp = model_fingerprint(self.model.path, root / ".fingerprints.json")
            template = self.model.chat_template or tokenizer.chat_template
            dpo = spec.objective.kind == "dpo"
            sid = scorer_id(fp, template, self.model.max_length, self.model.truncation, precision, dpo)
            about = {
                "model": self.model.path,
                "fingerprint": fp,
                "max_length": self.model.max_length,
                "truncation": self.model.truncation,
                "precision": precision,
                "chat_template": template,
                "last_turn_only": dpo,
            }
            self.store = ScoreStore(root, sid, about)
            self.known = self.store.load()
        self.preloaded = len(self.known)
        ds_config = reference_config(spec, precision)
        self.engine = inference_engine(load_scorer(self.model, ds_config, precision), ds_config)
        verify_head(self.engine, worlds, precision, self.model.name)
        write_rank_record(spec.run_dir, worlds, self.model.hub_id or self.model.path, self.engine.module)
        self.pad = pad_token_id(tokenizer)
        first = data.samples[data.schedule.usable[0]]
        # What a rank with no work left runs, so ZeRO-3's collective gathers stay in step.
        self.empty = empty_pass(first)
        self.unsaved: dict[str, tuple[float, int]] = {}
        self.forward_passes = self.scored = 0
        self.busy = 0.0
        self.tokens = self.processed_tokens = 0

    def score(self, rows: list[int]) -> tuple[dict[int, float], int]:
        """Scores of data rows (store hits, then forward passes for the rest).

        Every rank of the group must call this together: ZeRO-3 gathers the sharded parameters
        collectively in each forward pass, so all ranks run as many passes as the busiest one
        (the others run empty passes).

        Returns:
            (row -> score, forward passes this rank ran on real samples).
        """
        keys = self.data.keys
        out = {r: self.known[keys[r]][0] for r in rows if keys[r] in self.known}
        todo = [r for r in rows if r not in out]
        lengths = self.data.lengths
        budget = self.model.max_tokens_per_batch
        if budget is None:
            batches = length_grouped_batches(todo, lambda r: int(lengths[r]), self.model.score_batch_size)
        else:  # padding-free: as few packed batches of at most `budget` tokens as fit
            (bins,) = pack_positions([int(lengths[r]) for r in todo], budget, 1)
            batches = [[todo[i] for i in b] for b in bins if b]
        passes = torch.tensor([len(batches)], dtype=torch.long)
        if self.worlds.role.size > 1:
            passes = passes.to(self.worlds.device)
            dist.all_reduce(passes, op=dist.ReduceOp.MAX)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(int(passes.item())):
                chunk = batches[i] if i < len(batches) else []
                samples = [self.data.samples[r] for r in chunk]
                batch = (pack(samples) if budget else collate(samples, self.pad)) if chunk else self.empty
                if chunk:
                    self.tokens += batch.real_tokens
                    self.processed_tokens += batch.processed_tokens
                batch = batch.to(self.worlds.device)
                logp_sum, n_tokens = self.engine(*batch.inputs())
                # In float64: DPO recovers each sum as mean x tokens, exactly.
                values = (logp_sum.double() / n_tokens.double()).cpu().tolist()
                for r, v, n in zip(chunk, values, n_tokens.cpu().tolist()):
                    out[r] = v
                    self.known[keys[r]] = self.unsaved[keys[r]] = (v, n)
        self.busy += time.perf_counter() - t0
        self.forward_passes += len(batches)
        self.scored += len(todo)
        return out, len(batches)

    def flush(self) -> None:
        """Write the scores computed since the last flush to the store."""
        if self.store is not None:
            self.store.write(self.unsaved)
        self.unsaved = {}

    def summary(self) -> str:
        role = self.worlds.role
        return (
            f"[poft-ds] {role.name} rank {role.rank}: {self.scored} samples scored in {self.forward_passes} "
            f"forward passes ({self.busy:.1f}s), {self.preloaded} known from the score store"
        )


def serve_scores(
    spec: JobSpec,
    worlds: Worlds,
    data: PreparedData,
    tokenizer: PreTrainedTokenizerBase,
    start: int = 0,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Score every step's samples for this rank's aligned model and send them to the trainers.

    Each message to a trainer holds the scores of the positions it consumes, then this rank's
    forward passes and newly scored samples for the step (counted once, in the message to the
    first trainer this rank serves), which the trainers log; see `train.ScoreReceiver`. Under
    DPO a position is a pair (rows 2i, 2i+1) and its scores are four values: the chosen
    response's log-probability sum and token count, then the rejected one's (`score_width`).
    """
    role = worlds.role
    scorer = GroupScorer(spec, worlds, data, tokenizer)
    schedule = data.schedule
    G = schedule.global_batch
    mine = reference_positions(G, role.size, role.rank)
    dpo = spec.objective.kind == "dpo"

    def payload(by_row: dict[int, float], r: int) -> list[float]:
        if not dpo:
            return [by_row[r]]
        out = []
        for x in (r, r + 1):
            n = scorer.known[data.keys[x]][1]
            out += [by_row[x] * n, float(n)]
        return out

    pending: deque[tuple[int, int, torch.Tensor, object]] = deque()
    flushed_on_signal = False
    for step in range(start, schedule.total_steps):
        rows = schedule.global_batch_at(step)
        before = (scorer.scored, scorer.busy, scorer.tokens)
        by_row, passes = scorer.score(sorted({r for p in mine for r in unit_rows(spec, rows[p])}))
        # The step's work, which the trainers log: forward passes, newly scored samples, busy
        # seconds and real tokens scored.
        counts = [
            float(passes),
            float(scorer.scored - before[0]),
            scorer.busy - before[1],
            float(scorer.tokens - before[2]),
        ]
        for trainer in range(spec.trainer_ranks):
            shared = shared_positions(schedule, step, trainer, role.size, role.rank)
            if shared:
                # The step's work is reported once, to the first trainer this rank sends to.
                extra, counts = counts, [0.0] * len(counts)
                t = torch.tensor([v for p in shared for v in payload(by_row, rows[p])] + extra, dtype=torch.float64)
                # Trainers are global ranks [0, trainer_ranks); keep the buffer alive until sent.
                pending.append((step, trainer, t, worlds.send(t, trainer)))
        while pending and pending[0][0] <= step - spec.reference.prefetch_steps:
            _wait_taken(pending.popleft(), worlds, scorer.model.name, start)
        # On SIGTERM/SIGUSR1 save new scores at once; keep serving until the trainers checkpoint.
        if (step + 1) % spec.score_store.flush_every_steps == 0 or (local_stop_requested() and not flushed_on_signal):
            scorer.flush()
            flushed_on_signal = local_stop_requested()
        if heartbeat is not None:
            heartbeat.update(step=step + 1)  # steps scored (and sent) so far
    scorer.flush()
    while pending:
        _wait_taken(pending.popleft(), worlds, scorer.model.name, start)
    print(scorer.summary(), flush=True)
    write_rank_summary(spec.run_dir, worlds, scorer.tokens, scorer.processed_tokens, scorer.busy)


def _wait_taken(sent: tuple[int, int, torch.Tensor, object], worlds: Worlds, model: str, start: int) -> None:
    """Wait until a trainer has received a step's scores.

    Trainers take a step's scores when they begin that step: the first one after they loaded the
    model (start-up), later ones after the previous step, which may end with a checkpoint.
    """
    step, trainer, _, work = sent
    t = worlds.timeouts
    if step == start:
        timeout, field = t.startup_s, "timeouts.startup_s"
    else:
        timeout, field = t.step_s + t.checkpoint_s, "timeouts.step_s + timeouts.checkpoint_s"
    what = f"trainer rank {trainer} to take {model}'s scores of step {step + 1}"
    wait_for(work, worlds, what, timeout, field)


def score_dataset(spec: JobSpec, worlds: Worlds, data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> None:
    """Offline scoring: put every usable sample's score in the store, resuming after a crash.

    Rank j of the group scores every `ranks`-th sample; scores are flushed to the store every
    `score_store.flush_every_batches` batches, so a killed run loses at most that much work.
    """
    role = worlds.role
    scorer = GroupScorer(spec, worlds, data, tokenizer)
    usable = [r for unit in data.schedule.usable for r in unit_rows(spec, unit)]  # DPO: both rows of each pair
    mine = usable[role.rank :: role.size]
    left = [r for r in mine if data.keys[r] not in scorer.known]
    step = scorer.model.score_batch_size * spec.score_store.flush_every_batches
    # All ranks of a group loop the same number of times (collective forward passes).
    rounds = torch.tensor([-(-len(left) // step)], dtype=torch.long)
    if role.size > 1:
        rounds = rounds.to(worlds.device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    start = time.perf_counter()
    for i in range(int(rounds.item())):
        scorer.score(left[i * step : (i + 1) * step])
        scorer.flush()
        done = min((i + 1) * step, len(left))
        if role.rank == 0:
            rate = done / max(time.perf_counter() - start, 1e-9)
            eta = (len(left) - done) / max(rate, 1e-9)
            print(f"[poft-ds] {role.name}: {done}/{len(left)} new scores, ETA {eta:.0f}s", flush=True)
    print(scorer.summary(), flush=True)
    write_rank_summary(spec.run_dir, worlds, scorer.tokens, scorer.processed_tokens, scorer.busy)
