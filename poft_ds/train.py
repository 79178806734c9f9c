"""The trainer recipe: ZeRO-3 PoFT (or SFT) training of the target model.

Per optimizer step, each trainer rank:
  1. receives the aligned models' scores of its samples from the reference ranks (PoFT only);
  2. for each of its micro-batches: scores the samples under the target (mean response-token
     log-probability), computes the loss, and lets DeepSpeed accumulate the gradients;
  3. after the last micro-batch DeepSpeed clips, steps AdamW and the schedule;
  4. rank 0 logs the step's metrics, summed over all trainer ranks.

The loss of a step is defined over the whole global batch, whatever its split into trainers and
micro-batches: PoFT's per-sample mean over the global batch's samples, SFT's token mean over the
global batch's response tokens (so micro-batch size, trainer count and length grouping change
nothing; transformers fixed the same problem with `num_items_in_batch`). DeepSpeed divides each
micro-batch's loss by the accumulation steps and averages gradients over trainer ranks, so each
micro-batch passes its share of the global sum times `grad_accum x trainers`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

import deepspeed
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase, get_scheduler

from poft_ds.checkpoint import checkpoint_root, export_hf_model, load_checkpoint, save_checkpoint, save_resolved_spec
from poft_ds.data.batch import collate, empty_like, pack, pad_token_id
from poft_ds.data.chat import TokenizedSample
from poft_ds.data.prepare import PreparedData
from poft_ds.data.schedule import shared_positions
from poft_ds.distributed import (
    PREEMPTED_MARKER,
    Preempted,
    Worlds,
    peak_memory_bytes,
    preemption_requested,
    process_start_time,
)
from poft_ds.ds_config import resolve_precision, trainer_config
from poft_ds.loss import aggregate_reference_scores, poft_loss
from poft_ds.models import load_scorer, verify_head, write_rank_record, write_rank_summary
from poft_ds.spec import JobSpec


def build_engine(spec: JobSpec, worlds: Worlds, precision: str, total_steps: int) -> deepspeed.DeepSpeedEngine:
    """Load the target under ZeRO-3 and wrap it with AdamW and the learning-rate schedule.

    With the optimizer offloaded to the CPU (`offload_optimizer` in the DeepSpeed config) AdamW is
    DeepSpeed's CPU Adam, which the offload path requires and which is several times faster than
    torch's AdamW on the CPU.
    """
    ds_config = trainer_config(spec, precision)
    scorer = load_scorer(spec.model, ds_config, precision)
    t = spec.training
    if t.gradient_checkpointing:
        scorer.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        scorer.lm.config.use_cache = False
    # No weight decay on biases and norm gains (1-D parameters), as is standard for transformers.
    params = [p for p in scorer.parameters() if p.requires_grad]
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=t.learning_rate, betas=t.adam_betas, eps=t.adam_eps, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=t.adam_betas, eps=t.adam_eps)
    schedule_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_schedule]

    def make_schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return get_scheduler(
            schedule_name, opt, num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps
        )

    engine, *_ = deepspeed.initialize(model=scorer, optimizer=optimizer, lr_scheduler=make_schedule, config=ds_config)
    verify_head(engine, worlds, precision, "target")
    write_rank_record(spec.run_dir, worlds, spec.model.path, engine.module, type(optimizer).__name__)
    return engine


def receive_reference_scores(
    spec: JobSpec, worlds: Worlds, data: PreparedData, step: int, rows: list[int], first_step: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """This trainer's per-model scores for one step, and the reference ranks' work on it.

    `rows` is the step's global batch (`schedule.global_batch_at(step)`). The first step's scores wait
    for the reference ranks to load their models (start-up).

    Returns:
        (scores, counts): [samples of this trainer, K] float64 scores in its micro-batch order, and
        [2] = (reference forward passes, newly scored samples) reported to this trainer.
    """
    schedule = data.schedule
    trainer = worlds.role.rank
    positions = schedule.trainer_positions(trainer, step)
    counts = torch.zeros(2, dtype=torch.float64)
    if spec.data.reference_score_column:
        return torch.tensor([[data.ref_scores[rows[p]]] for p in positions], dtype=torch.float64), counts
    if data.store_scores is not None:  # store-only: no reference rank runs
        return torch.from_numpy(data.store_scores[[rows[p] for p in positions]]), counts
    t = spec.timeouts
    wait = (t.startup_s, "timeouts.startup_s") if first_step else (t.step_s, "timeouts.step_s")
    where = {p: i for i, p in enumerate(positions)}
    scores = torch.full((len(positions), len(spec.aligned_models)), float("nan"), dtype=torch.float64)
    first = spec.trainer_ranks
    for k, model in enumerate(spec.aligned_models):
        for j in range(model.ranks):
            shared = shared_positions(schedule, step, trainer, model.ranks, j)
            if not shared:
                continue
            buf = torch.empty(len(shared) + 2, dtype=torch.float64)
            worlds.recv(
                buf,
                first + j,
                f"step {step + 1} scores of aligned model '{model.name}' (reference rank {j})",
                *wait,
            )
            scores[[where[p] for p in shared], k] = buf[:-2]
            counts += buf[-2:]
        first += model.ranks
    return scores, counts


class StepStats:
    """Sums over one optimizer step's micro-batches, kept on the device and reduced over trainer
    ranks once per step (no host synchronisation per micro-batch).

    Besides the named fields it holds the K aligned models' score sums.
    """

    FIELDS = (
        "loss",
        "micro_batches",
        "samples",
        "weight",
        "s_target",
        "s_ref",
        "logp",
        "tokens",
        "real_tokens",
        "processed_tokens",
        "ref_forward_passes",
        "ref_new_scores",
        "nonfinite_micro_batches",
    )

    def __init__(self, n_models: int, device: torch.device) -> None:
        self.n_models = n_models
        self.v = torch.zeros(len(self.FIELDS) + n_models, dtype=torch.float64, device=device)

    def add(self, **values: float | torch.Tensor) -> None:
        for k, x in values.items():
            self.v[self.FIELDS.index(k)] += x

    def add_model_scores(self, per_model: torch.Tensor) -> None:
        self.v[len(self.FIELDS) : len(self.FIELDS) + self.n_models] += per_model.sum(dim=0).double()

    def reduced(self) -> dict[str, Any]:
        """The sums over every trainer rank (collective; the step's one host synchronisation)."""
        dist.all_reduce(self.v)
        v = self.v.tolist()
        n = len(self.FIELDS)
        return dict(zip(self.FIELDS, v[:n])) | {"per_model": v[n : n + self.n_models]}


def train(
    spec: JobSpec,
    worlds: Worlds,
    data: PreparedData,
    tokenizer: PreTrainedTokenizerBase,
    resume_from: Path | None = None,
) -> None:
    """Train the target model for the whole schedule; checkpoint and export as the spec says.

    Args:
        spec: The job.
        worlds: This rank's process groups.
        data: The tokenized data and schedule.
        tokenizer: The target's tokenizer (saved with the final model).
        resume_from: A verified checkpoint folder to continue from.

    Raises:
        Preempted: after writing a checkpoint, when SIGTERM or SIGUSR1 asked the job to stop.
    """
    run_dir = Path(spec.run_dir)
    rank = worlds.role.rank
    schedule = data.schedule
    poft = spec.objective.kind == "poft"
    precision = resolve_precision(spec, worlds.device)
    engine = build_engine(spec, worlds, precision, schedule.total_steps)
    pad = pad_token_id(tokenizer)
    names = [m.name for m in spec.aligned_models] if poft else []
    if spec.data.reference_score_column:
        names = [spec.data.reference_score_column]
    start = load_checkpoint(engine, resume_from) if resume_from else 0
    if rank == 0:
        save_resolved_spec(spec, run_dir)
        if start:
            _truncate_metrics(run_dir / "metrics.jsonl", start)
            print(f"[poft-ds] resumed from {resume_from} at step {start}", flush=True)
        print(
            f"[poft-ds] training {schedule.total_steps} steps ({schedule.total_epochs:.3g} epochs of "
            f"{schedule.steps_per_epoch} steps): {len(schedule.usable)} samples, "
            f"global batch {schedule.global_batch} = {schedule.trainers} trainers x {schedule.micro_batch} micro "
            f"x {schedule.grad_accum} accumulation; {schedule.leftover_per_epoch} samples per epoch left over "
            f"(incomplete last global batch)",
            flush=True,
        )
    with contextlib.ExitStack() as files:
        metrics = files.enter_context(open(run_dir / "metrics.jsonl", "a")) if rank == 0 else None
        dump = None
        if spec.logging.dump_scores:
            (run_dir / "scores").mkdir(parents=True, exist_ok=True)
            dump = files.enter_context(open(run_dir / "scores" / f"trainer{rank}.jsonl", "a"))
        _train_steps(spec, worlds, data, engine, pad, names, metrics, dump, start)
    if spec.checkpoint.save_final_model:
        export_hf_model(engine, tokenizer, run_dir / "final_model")
    if rank == 0:
        print(f"[poft-ds] done: {run_dir}", flush=True)


def _train_steps(
    spec: JobSpec,
    worlds: Worlds,
    data: PreparedData,
    engine: deepspeed.DeepSpeedEngine,
    pad: int,
    names: list[str],
    metrics: TextIO | None,
    dump: TextIO | None,
    start: int,
) -> None:
    """The optimizer steps of the schedule from `start`, with logging and periodic checkpoints."""
    rank = worlds.role.rank
    schedule = data.schedule
    poft = spec.objective.kind == "poft"
    policy = spec.training.on_nonfinite
    packed = schedule.max_tokens is not None
    # A rank with fewer samples than the busiest runs empty passes on a two-token batch.
    first = data.samples[schedule.usable[0]]
    empty = empty_like(pack([TokenizedSample(first.input_ids[:2], [False, False])]))
    fingerprint = data.fingerprint(spec)
    response_tokens = data.samples.scored_tokens()  # per row, read from the Arrow column
    mine = {"tokens": 0, "processed_tokens": 0, "busy_s": 0.0}  # this rank's work, for its summary
    for step in range(start, schedule.total_steps):
        t_start = time.perf_counter()
        rows = schedule.global_batch_at(step)
        micro_batches = schedule.micro_batches(step, rank)
        step_tokens = int(response_tokens[rows].sum())  # SFT's denominator: the whole global batch
        stats = StepStats(len(names), worlds.device)
        if poft:
            ref, counts = receive_reference_scores(spec, worlds, data, step, rows, first_step=step == start)
            stats.add(ref_forward_passes=counts[0], ref_new_scores=counts[1])
        waited = time.perf_counter() - t_start
        done = 0  # samples of this trainer's step already run
        for positions in micro_batches:
            idx = [rows[p] for p in positions]
            samples = [data.samples[i] for i in idx]
            cpu_batch = (pack(samples) if packed else collate(samples, pad)) if idx else empty
            batch = cpu_batch.to(worlds.device)
            logp_sum, n_tokens = engine(*batch.inputs())
            s_target = logp_sum / n_tokens
            if poft:
                ref_m = ref[done : done + len(idx)]
                s_ref = aggregate_reference_scores(ref_m, spec.objective.aggregation).to(s_target.device)
                per_sample, weight = poft_loss(s_target, s_ref, spec.objective.beta, spec.objective.gamma)
                loss = per_sample.sum() / schedule.global_batch  # this micro-batch's part of the mean
            else:
                # This micro-batch's part of the token-level cross-entropy of the global batch.
                loss = -logp_sum.sum() / step_tokens
            done += len(idx)
            # A non-finite loss is left out on the device, without a host synchronisation: it is
            # counted, and the step's one reduction below decides (stop, or go on without it).
            # Its graph may still carry 0 x inf = nan into the gradients; DeepSpeed's step then
            # finds a non-finite gradient norm and discards the whole update.
            finite = torch.isfinite(loss.detach())
            # DeepSpeed averages gradients over the trainers; each passes its share of the sum.
            engine.backward(torch.where(finite, loss, 0.0) * schedule.trainers, scale_wrt_gas=False)
            # Sums stay on the device: no host synchronisation until the step's one all-reduce.
            if poft:
                stats.add(weight=(weight * finite).sum(), s_ref=s_ref.sum())
                stats.add_model_scores(ref_m.to(stats.v.device))
            stats.add(
                loss=torch.where(finite, loss.detach(), 0.0),
                nonfinite_micro_batches=~finite,
                micro_batches=1,
                samples=len(idx),
                s_target=s_target.detach().sum(),
                logp=logp_sum.detach().sum(),
                tokens=n_tokens.sum(),
                real_tokens=cpu_batch.real_tokens if idx else 0,
                processed_tokens=cpu_batch.processed_tokens,
            )
            mine["tokens"] += cpu_batch.real_tokens if idx else 0
            mine["processed_tokens"] += cpu_batch.processed_tokens
            if dump is not None:  # a debugging aid: it reads the scores on the host
                values = s_target.detach().tolist()
                for j, i in enumerate(idx):
                    rec = {"step": step + 1, "row": i, "where": data.where[i], "s_target": values[j]}
                    if poft:
                        rec["scores"] = dict(zip(names, ref_m[j].tolist()))
                    dump.write(json.dumps(rec) + "\n")
        s = stats.reduced()
        nonfinite = int(s["nonfinite_micro_batches"])
        if nonfinite and policy == "stop":
            raise FloatingPointError(
                f"step {step + 1}: non-finite loss in {nonfinite} micro-batch(es) over the trainer ranks; "
                "stopped before the update (weights and checkpoints are untouched; training.on_nonfinite: skip "
                "leaves such micro-batches out instead)"
            )
        engine.step()  # one boundary per optimizer step: clip, AdamW, learning-rate schedule
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        step_skipped = not math.isfinite(grad_norm)
        if step_skipped and not (nonfinite and policy == "skip"):
            raise FloatingPointError(
                f"step {step + 1}: the gradient norm is {grad_norm}; stopping before any checkpoint holds "
                f"non-finite weights (the last good one is in {checkpoint_root(spec)})"
            )
        elapsed = time.perf_counter() - t_start
        mine["busy_s"] += elapsed - waited
        last = step + 1 == schedule.total_steps
        evals = {}
        if data.eval_rows and ((step + 1) % spec.logging.eval_every_steps == 0 or last):
            evals = evaluate(engine, data, worlds, pad)  # collective: every trainer takes part
        if metrics is not None and ((step + 1) % spec.logging.every_steps == 0 or last or evals):
            n = s["samples"] or float("nan")
            rec = {
                "step": step + 1,
                "epoch": schedule.epoch_of(step),
                "loss": s["loss"] if nonfinite < s["micro_batches"] else float("nan"),
                "cross_entropy": -s["logp"] / (s["tokens"] or float("nan")),
                "s_target": s["s_target"] / n,
                "skipped_micro_batches": nonfinite,
                "lr": engine.get_lr()[0],
                "grad_norm": None if step_skipped else grad_norm,
                "tokens": int(s["real_tokens"]),
                "step_time_s": elapsed,
                "tokens_per_s": s["real_tokens"] / elapsed,
                "padding_efficiency": s["real_tokens"] / s["processed_tokens"],
                "micro_batches": int(s["micro_batches"]),
                "wait_for_scores_s": waited,
                "peak_memory_bytes": peak_memory_bytes(worlds.device),
            }
            if step_skipped:
                rec["step_skipped"] = True
            if step == start:
                rec["time_to_first_step_s"] = time.time() - process_start_time()
            rec |= evals
            if poft:
                rec |= {"poft_weight": s["weight"] / n, "s_ref": s["s_ref"] / n}
                rec |= {"ref_forward_passes": int(s["ref_forward_passes"]), "ref_new_scores": int(s["ref_new_scores"])}
                rec |= {f"s_ref/{name}": v / n for name, v in zip(names, s["per_model"])}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            print(
                "[poft-ds] " + " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()),
                flush=True,
            )
        stop = preemption_requested(worlds)
        if (step + 1) % spec.checkpoint.every_steps == 0 or step + 1 == schedule.total_steps or stop:
            save_checkpoint(engine, spec, step + 1, fingerprint)
        if stop and step + 1 < schedule.total_steps:
            if rank == 0:
                (Path(spec.run_dir) / PREEMPTED_MARKER).write_text(str(step + 1))
                print(f"[poft-ds] preempted: checkpoint at step {step + 1} written; exiting", flush=True)
            raise Preempted(step + 1)
    write_rank_summary(spec.run_dir, worlds, **mine)


def evaluate(engine: deepspeed.DeepSpeedEngine, data: PreparedData, worlds: Worlds, pad: int) -> dict[str, float]:
    """Cross-entropy and mean score of the target on the held-out rows, over all trainer ranks.

    Rows are dealt round-robin to trainers; every trainer runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively), padding with empty ones.
    """
    role = worlds.role
    mine = list(data.eval_rows[role.rank :: role.size])
    mb = data.schedule.micro_batch
    per_rank = -(-len(data.eval_rows) // role.size)
    passes = -(-per_rank // mb)
    sums = torch.zeros(3, dtype=torch.float64, device=worlds.device)  # logp, tokens, per-sample score
    was_training = engine.module.training
    engine.eval()
    with torch.no_grad():
        for i in range(passes):
            chunk = mine[i * mb : (i + 1) * mb]
            batch = collate([data.samples[r] for r in chunk or data.eval_rows[:1]], pad)
            batch = (batch if chunk else empty_like(batch)).to(worlds.device)
            logp_sum, n_tokens = engine(*batch.inputs())
            sums += torch.stack([logp_sum.sum(), n_tokens.sum(), (logp_sum / n_tokens).sum()]).double()
    if was_training:
        engine.train()
    dist.all_reduce(sums)
    logp, tokens, score = sums.tolist()
    return {"eval_cross_entropy": -logp / tokens, "eval_s_target": score / len(data.eval_rows)}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint a run resumes from (they will be logged again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
