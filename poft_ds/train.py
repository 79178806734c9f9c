"""The trainer recipe: ZeRO-3 PoFT (or SFT, or DPO) training of the target model.

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

DPO runs on the same loop: a sample is a preference pair (rows 2i and 2i+1 of the data, the
chosen and rejected conversations, always in one micro-batch), the frozen reference model's
ranks send each pair's log-probability sums, and the loss is DPO's mean over the global batch's
pairs (`poft_ds.loss.dpo_loss`), logged under TRL's metric names.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import deepspeed
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase, get_scheduler

from poft_ds.checkpoint import checkpoint_root, export_hf_model, load_checkpoint, save_checkpoint, save_resolved_spec
from poft_ds.data.batch import collate, empty_pass, pack, pad_token_id
from poft_ds.data.prepare import PreparedData, unit_rows
from poft_ds.data.schedule import pack_positions, shared_positions
from poft_ds.distributed import (
    PREEMPTED_MARKER,
    Preempted,
    Worlds,
    local_stop_requested,
    peak_memory_bytes,
    process_start_time,
    wait_for,
)
from poft_ds.ds_config import resolve_precision, trainer_config
from poft_ds.environment import model_records, write_environment
from poft_ds.files import atomic_write
from poft_ds.loggers import MetricsLogger
from poft_ds.loss import aggregate_reference_scores, dpo_loss, poft_loss
from poft_ds.models import load_scorer, rank_table, verify_head, write_rank_record, write_rank_summary
from poft_ds.rank_logs import Progress
from poft_ds.spec import JobSpec
from poft_ds.status import Heartbeat


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
    write_rank_record(
        spec.run_dir, worlds, spec.model.hub_id or spec.model.path, engine.module, type(optimizer).__name__
    )
    return engine


REPORTED = 4  # a score message ends with the reference rank's work: passes, new scores, busy s, tokens


def score_width(spec: JobSpec) -> int:
    """Values per sample and aligned model in a score message: PoFT's score, or DPO's pair
    (chosen log-probability sum, its tokens, rejected sum, its tokens)."""
    return 4 if spec.objective.kind == "dpo" else 1


class ScoreReceiver:
    """The aligned models' scores of this trainer's samples, received one step ahead.

    Gloo hands a message over only once the receiver has posted its receive (a round trip with
    the sender's I/O thread), so a receive posted when a step begins made every step wait for
    that round trip, waking the sleeping reference process: about 5 ms a step on a 2-core VM,
    most of PoFT-online's cost over SFT. `take(step)` therefore posts the receives of step + 1
    before returning step's scores, and they arrive while the trainer computes.
    """

    def __init__(self, spec: JobSpec, worlds: Worlds, data: PreparedData, start: int) -> None:
        self.spec, self.worlds, self.data, self.start = spec, worlds, data, start
        self.posted: dict[int, list[tuple[int, list[int], torch.Tensor, dist.Work, str]]] = {}

    def _post(self, step: int) -> None:
        """Post the receives of one step's scores, from every reference rank that shares them."""
        if step in self.posted or step >= self.data.schedule.total_steps:
            return
        trainer = self.worlds.role.rank
        works = []
        src = self.spec.trainer_ranks  # reference ranks follow the trainers, model by model
        for k, model in enumerate(self.spec.aligned_models):
            for j in range(model.ranks):
                shared = shared_positions(self.data.schedule, step, trainer, model.ranks, j)
                if shared:
                    buf = torch.empty(len(shared) * score_width(self.spec) + REPORTED, dtype=torch.float64)
                    what = f"step {step + 1} scores of aligned model '{model.name}' (reference rank {j}) from global rank {src + j}"
                    works.append((k, shared, buf, self.worlds.irecv(buf, src + j), what))
            src += model.ranks
        self.posted[step] = works

    def take(self, step: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """This trainer's per-model scores for one step, and the reference ranks' work on it.

        `rows` is the step's global batch (`schedule.global_batch_at(step)`). The first step's
        scores wait for the reference ranks to load their models (start-up).

        Returns:
            (scores, counts): [samples of this trainer, K x width] float64 scores in its micro-batch
            order (`score_width` values per model),
            and [REPORTED] = the reference ranks' work on the step reported to this trainer: forward
            passes, newly scored samples, busy seconds, real tokens scored.
        """
        spec, data = self.spec, self.data
        positions = data.schedule.trainer_positions(self.worlds.role.rank, step)
        counts = torch.zeros(REPORTED, dtype=torch.float64)
        if spec.data.reference_score_column:
            return torch.tensor([[data.ref_scores[rows[p]]] for p in positions], dtype=torch.float64), counts
        if data.store_scores is not None:  # store-only: no reference rank runs
            return torch.from_numpy(data.store_scores[[rows[p] for p in positions]]), counts
        self._post(step)
        self._post(step + 1)
        t = spec.timeouts
        wait = (t.startup_s, "timeouts.startup_s") if step == self.start else (t.step_s, "timeouts.step_s")
        where = {p: i for i, p in enumerate(positions)}
        w = score_width(spec)
        scores = torch.full((len(positions), len(spec.aligned_models) * w), float("nan"), dtype=torch.float64)
        for k, shared, buf, work, what in self.posted.pop(step):
            wait_for(work, self.worlds, what, *wait)
            scores[[where[p] for p in shared], k * w : (k + 1) * w] = buf[:-REPORTED].view(len(shared), w)
            counts += buf[-REPORTED:]
        return scores, counts


class StepStats:
    """Sums over one optimizer step's micro-batches, kept on the device and reduced over trainer
    ranks once per step (no host synchronisation per micro-batch).

    Besides the named fields it holds the K aligned models' score sums, each trainer's peak memory
    (one slot per trainer, so the sum is the list) and, per position of the global batch, the
    sample's weight, target score, reference score and whether it was trained on (a trainer
    writes only its own positions, so the sum is the whole global batch: weight quantiles and the
    per-sample log need no second collective).
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
        "ref_busy_s",
        "ref_tokens",
        "nonfinite_micro_batches",
        "stop_requested",  # trainers asked to stop (SIGTERM / SIGUSR1): any one stops them all
        # DPO: sums over the step's pairs.
        "rewards_chosen",
        "rewards_rejected",
        "rewards_correct",
        "logps_chosen",
        "logps_rejected",
    )
    PER_SAMPLE = ("weight", "s_target", "s_ref", "trained")

    def __init__(self, n_models: int, trainers: int, global_batch: int, device: torch.device) -> None:
        self.n_models, self.trainers, self.global_batch = n_models, trainers, global_batch
        self.models_at = len(self.FIELDS)
        self.memory_at = self.models_at + n_models
        self.samples_at = self.memory_at + trainers
        size = self.samples_at + len(self.PER_SAMPLE) * global_batch
        self.v = torch.zeros(size, dtype=torch.float64, device=device)

    def add(self, **values: float | torch.Tensor) -> None:
        for k, x in values.items():
            self.v[self.FIELDS.index(k)] += x

    def add_model_scores(self, per_model: torch.Tensor) -> None:
        self.v[self.models_at : self.memory_at] += per_model.sum(dim=0).double()

    def set_peak_memory(self, trainer: int, nbytes: int) -> None:
        self.v[self.memory_at + trainer] = float(nbytes)

    def set_samples(self, positions: list[int], **values: torch.Tensor) -> None:
        """Per-sample values (`PER_SAMPLE` names) of a micro-batch's positions in the global batch."""
        index = torch.tensor(positions, dtype=torch.long, device=self.v.device)
        for k, x in values.items():
            at = self.samples_at + self.PER_SAMPLE.index(k) * self.global_batch
            self.v[at : at + self.global_batch].index_copy_(0, index, x.detach().double().to(self.v.device))

    def reduced(self) -> dict[str, Any]:
        """The sums over every trainer rank (collective; the step's one host synchronisation)."""
        dist.all_reduce(self.v)
        v = self.v.tolist()
        out = dict(zip(self.FIELDS, v[: self.models_at]))
        out["per_model"] = v[self.models_at : self.memory_at]
        out["peak_memory"] = v[self.memory_at : self.samples_at]
        for i, k in enumerate(self.PER_SAMPLE):
            at = self.samples_at + i * self.global_batch
            out[f"sample_{k}"] = v[at : at + self.global_batch]
        return out


def weight_metrics(s: dict[str, Any]) -> dict[str, float]:
    """Quantiles of the per-sample PoFT weight over a step's trained samples, and the fraction of
    them the target already scores above the aligned models (s_target > s_ref)."""
    trained = [i for i, t in enumerate(s["sample_trained"]) if t > 0]
    if not trained:
        return {}
    w = torch.tensor([s["sample_weight"][i] for i in trained], dtype=torch.float64)
    q = torch.quantile(w, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    beats = sum(s["sample_s_target"][i] > s["sample_s_ref"][i] for i in trained) / len(trained)
    return {"poft_weight/p10": q[0], "poft_weight/p50": q[1], "poft_weight/p90": q[2], "target_beats_ref": beats}


def train(
    spec: JobSpec,
    worlds: Worlds,
    data: PreparedData,
    tokenizer: PreTrainedTokenizerBase,
    resume_from: Path | None = None,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Train the target model for the whole schedule; checkpoint and export as the spec says.

    Args:
        spec: The job.
        worlds: This rank's process groups.
        data: The tokenized data and schedule.
        tokenizer: The target's tokenizer (saved with the final model).
        resume_from: A verified checkpoint folder to continue from.
        heartbeat: This rank's heartbeat, told each finished step.

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
            _truncate_metrics(run_dir / "samples.jsonl", start)
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
        log = sample_log = None
        if rank == 0:
            log = files.enter_context(MetricsLogger(run_dir, spec.logging, spec.public_dump(), resume_step=start))
            if poft:  # per-sample scores and weights of every logged step (plots, analysis)
                sample_log = files.enter_context(open(run_dir / "samples.jsonl", "a"))
        dump = None
        if spec.logging.dump_scores:
            (run_dir / "scores").mkdir(parents=True, exist_ok=True)
            dump = files.enter_context(open(run_dir / "scores" / f"trainer{rank}.jsonl", "a"))
        progress = Progress("training", schedule.total_steps, "step", done=start) if rank == 0 else None
        if progress is not None:
            files.callback(progress.close)
        _train_steps(spec, worlds, data, engine, pad, names, log, sample_log, dump, start, progress, heartbeat)
    if spec.checkpoint.save_final_model:
        export_hf_model(engine, tokenizer, run_dir / "final_model")
    if rank == 0:
        _write_plots(run_dir)
        if spec.eval.answer_field and spec.data.eval_fraction and spec.checkpoint.save_final_model:
            _evaluate_final_model(spec, run_dir)
        print(f"[poft-ds] done: {run_dir}", flush=True)


def _train_steps(
    spec: JobSpec,
    worlds: Worlds,
    data: PreparedData,
    engine: deepspeed.DeepSpeedEngine,
    pad: int,
    names: list[str],
    log: MetricsLogger | None,
    sample_log: TextIO | None,
    dump: TextIO | None,
    start: int,
    progress: Progress | None,
    heartbeat: Heartbeat | None,
) -> None:
    """The optimizer steps of the schedule from `start`, with logging and periodic checkpoints."""
    rank = worlds.role.rank
    schedule = data.schedule
    poft, dpo = spec.objective.kind == "poft", spec.objective.kind == "dpo"
    policy = spec.training.on_nonfinite
    packed = schedule.max_tokens is not None
    # A rank with fewer samples than the busiest runs empty passes on a two-token batch.
    first = data.samples[schedule.usable[0]]
    empty = empty_pass(first)
    fingerprint = data.fingerprint(spec)
    response_tokens = data.samples.scored_tokens()  # per row, read from the Arrow column
    mine = {"tokens": 0, "processed_tokens": 0, "busy_s": 0.0}  # this rank's work, for its summary
    receiver = ScoreReceiver(spec, worlds, data, start)
    for step in range(start, schedule.total_steps):
        t_start = time.perf_counter()
        rows = schedule.global_batch_at(step)
        micro_batches = schedule.micro_batches(step, rank)
        step_tokens = int(response_tokens[rows].sum())  # SFT's denominator: the whole global batch
        stats = StepStats(len(names), schedule.trainers, schedule.global_batch, worlds.device)
        if poft or dpo:
            ref, counts = receiver.take(step, rows)
            stats.add(
                ref_forward_passes=counts[0], ref_new_scores=counts[1], ref_busy_s=counts[2], ref_tokens=counts[3]
            )
        waited = time.perf_counter() - t_start
        done = 0  # samples of this trainer's step already run
        for positions in micro_batches:
            idx = [rows[p] for p in positions]
            # A DPO pair is its chosen row i and rejected row i + 1, run side by side.
            samples = [data.samples[r] for i in idx for r in unit_rows(spec, i)]
            cpu_batch = (pack(samples) if packed else collate(samples, pad)) if idx else empty
            batch = cpu_batch.to(worlds.device)
            logp_sum, n_tokens = engine(*batch.inputs())
            if dpo:
                logp_sum, n_tokens, logp_rejected, n_rejected = (
                    logp_sum[0::2],
                    n_tokens[0::2],
                    logp_sum[1::2],
                    n_tokens[1::2],
                )
            s_target = logp_sum / n_tokens
            if dpo:
                ref_m = ref[done : done + len(idx)].to(s_target.device)  # chosen sum, tokens, rejected sum, tokens
                o = spec.objective
                if o.loss_type == "ipo":  # IPO compares mean log-probabilities
                    policy_pair = (s_target, logp_rejected / n_rejected)
                    ref_pair = (ref_m[:, 0] / ref_m[:, 1], ref_m[:, 2] / ref_m[:, 3])
                else:
                    policy_pair, ref_pair = (logp_sum, logp_rejected), (ref_m[:, 0], ref_m[:, 2])
                per_sample, chosen_r, rejected_r = dpo_loss(
                    *policy_pair, *ref_pair, o.beta, o.loss_type, o.label_smoothing
                )
                loss = per_sample.sum() / schedule.global_batch  # this micro-batch's part of the mean
            elif poft:
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
            if idx:
                trained = finite.double().expand(len(idx))
                stats.set_samples(positions, s_target=s_target, trained=trained)
            if dpo:
                stats.add(
                    rewards_chosen=chosen_r.sum(),
                    rewards_rejected=rejected_r.sum(),
                    rewards_correct=(chosen_r > rejected_r).sum(),
                    logps_chosen=logp_sum.detach().sum(),
                    logps_rejected=logp_rejected.detach().sum(),
                )
            if poft:
                stats.add(weight=(weight * finite).sum(), s_ref=s_ref.sum())
                stats.add_model_scores(ref_m.to(stats.v.device))
                if idx:
                    stats.set_samples(positions, weight=weight, s_ref=s_ref)
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
                    if dpo:
                        rec["logps"] = {"chosen": logp_sum[j].item(), "rejected": logp_rejected[j].item()}
                        rec["ref_logps"] = {"chosen": ref_m[j, 0].item(), "rejected": ref_m[j, 2].item()}
                    dump.write(json.dumps(rec) + "\n")
        if dump is not None:
            dump.flush()  # a step's lines survive a kill (and a resume rewrites the steps after its checkpoint)
        stats.set_peak_memory(rank, peak_memory_bytes(worlds.device))
        # Whether any trainer was asked to stop rides on the step's one reduction: all of them stop
        # after the same step, with no second collective and host synchronisation after the update.
        stats.add(stop_requested=float(local_stop_requested()))
        s = stats.reduced()
        stop = s["stop_requested"] > 0
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
        t_checkpoint = time.perf_counter()
        if (step + 1) % spec.checkpoint.every_steps == 0 or last or stop:
            save_checkpoint(engine, spec, step + 1, fingerprint)
        checkpoint_s = time.perf_counter() - t_checkpoint
        if log is not None and ((step + 1) % spec.logging.every_steps == 0 or last or evals):
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
                # Where the step's seconds went: waiting for scores, the passes and the
                # optimizer step (compute, which includes the evaluation when there is one),
                # and writing the checkpoint (after the step; not in step_time_s).
                "wait_for_scores_s": waited,
                "compute_s": elapsed - waited,
                "checkpoint_s": checkpoint_s,
                "peak_memory_bytes": int(max(s["peak_memory"])),  # the largest over trainer ranks
            }
            if step_skipped:
                rec["step_skipped"] = True
            if step == start:
                rec["time_to_first_step_s"] = time.time() - process_start_time()
            rec |= evals
            if dpo:  # TRL's names
                rec |= {
                    "rewards/chosen": s["rewards_chosen"] / n,
                    "rewards/rejected": s["rewards_rejected"] / n,
                    "rewards/accuracies": s["rewards_correct"] / n,
                    "rewards/margins": (s["rewards_chosen"] - s["rewards_rejected"]) / n,
                    "logps/chosen": s["logps_chosen"] / n,
                    "logps/rejected": s["logps_rejected"] / n,
                    "ref_forward_passes": int(s["ref_forward_passes"]),
                    "ref_new_scores": int(s["ref_new_scores"]),
                }
            if poft:
                rec |= {"poft_weight": s["weight"] / n, "s_ref": s["s_ref"] / n} | weight_metrics(s)
                rec |= {"ref_forward_passes": int(s["ref_forward_passes"]), "ref_new_scores": int(s["ref_new_scores"])}
                if spec.reference_ranks:
                    # Reference ranks score ahead (prefetch), so a step's reference work is
                    # set against the trainers' seconds of the step it arrives with.
                    rec["ref_busy_fraction"] = s["ref_busy_s"] / (spec.reference_ranks * elapsed)
                    rec["ref_tokens_per_s"] = s["ref_tokens"] / s["ref_busy_s"] if s["ref_busy_s"] else None
                rec |= {f"s_ref/{name}": v / n for name, v in zip(names, s["per_model"])}
                if sample_log is not None:
                    sample_log.write(json.dumps(_sample_record(step + 1, rows, s)) + "\n")
                    sample_log.flush()
            log.log(rec)
            progress.write(
                "[poft-ds] " + " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
            )
        if progress is not None:
            progress.update(step + 1)
            if step == start:  # by now every rank has loaded its model and written its record
                progress.write("[poft-ds] ranks:\n" + rank_table(spec.run_dir, worlds.identity.world_size))
                env = write_environment(spec.run_dir, process_start_time(), model_records(spec))
                differs = env["software_differs"]
                if differs:
                    print(f"[poft-ds] warning: software differs between ranks: {'; '.join(differs)}", file=sys.stderr)
        if heartbeat is not None:
            heartbeat.update(step=step + 1, epoch=schedule.epoch_of(step))
        if stop and not last:
            if rank == 0:
                (Path(spec.run_dir) / PREEMPTED_MARKER).write_text(str(step + 1))
                print(f"[poft-ds] preempted: checkpoint at step {step + 1} written; exiting", flush=True)
            raise Preempted(step + 1)
    write_rank_summary(spec.run_dir, worlds, **mine)


def evaluate(engine: deepspeed.DeepSpeedEngine, data: PreparedData, worlds: Worlds, pad: int) -> dict[str, float]:
    """Cross-entropy and mean score of the target on the held-out rows, over all trainer ranks.

    Held-out rows are split as training rows are: packed to the token budget and dealt so every
    trainer runs the same number of forward passes (ZeRO-3 gathers parameters collectively), or,
    without packing, round-robin in micro-batches; a trainer short of work runs empty passes.
    """
    role, schedule = worlds.role, data.schedule
    rows = list(data.eval_rows)
    if schedule.max_tokens is not None:
        plan = pack_positions([int(schedule.lengths[r]) for r in rows], schedule.max_tokens, role.size)[role.rank]
        chunks = [[rows[p] for p in positions] for positions in plan]
    else:
        mine, mb = rows[role.rank :: role.size], schedule.micro_batch
        per_rank = math.ceil(len(rows) / role.size)
        passes = math.ceil(per_rank / mb)
        chunks = [mine[i * mb : (i + 1) * mb] for i in range(passes)]
    first = data.samples[rows[0]]
    empty = empty_pass(first)
    sums = torch.zeros(3, dtype=torch.float64, device=worlds.device)  # logp, tokens, per-sample score
    was_training = engine.module.training
    engine.eval()
    with torch.no_grad():
        for chunk in chunks:
            samples = [data.samples[r] for r in chunk]
            batch = (pack(samples) if schedule.max_tokens is not None else collate(samples, pad)) if chunk else empty
            logp_sum, n_tokens = engine(*batch.to(worlds.device).inputs())
            if chunk:
                sums += torch.stack([logp_sum.sum(), n_tokens.sum(), (logp_sum / n_tokens).sum()]).double()
    if was_training:
        engine.train()
    dist.all_reduce(sums)
    logp, tokens, score = sums.tolist()
    return {"eval_cross_entropy": -logp / tokens, "eval_s_target": score / len(rows)}


def _write_plots(run_dir: Path) -> None:
    """The run's figures (`poft-ds plot`), at the end of training; a failure to draw is reported,
    never fatal: the model is already saved."""
    try:
        from poft_ds.plot import plot_run

        paths = plot_run(run_dir)
        print(f"[poft-ds] plots: {', '.join(p.name for p in paths)} in {run_dir / 'plots'}", flush=True)
    except Exception as e:  # matplotlib missing or a figure failing must not fail a finished run
        print(f"[poft-ds] plots not written: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def _evaluate_final_model(spec: JobSpec, run_dir: Path) -> None:
    """`poft-ds eval` of the final model on the held-out rows, into RUN_DIR/eval.json (one process:
    greedy answers checked against `eval.answer_field`). The other ranks wait at the final barrier.
    A failure is reported, never fatal: the model is already saved."""
    try:
        from poft_ds.evaluate import evaluate_model, write_report

        report = evaluate_model(spec, run_dir / "final_model")
        write_report(report, run_dir / "eval.json")
        em = report["exact_match"]
        print(
            f"[poft-ds] eval of final_model on {report['evaluated']} held-out rows: exact match "
            f"{'-' if em is None else f'{em:.4g}'}, mean log-prob {report['mean_logprob']:.5g}, "
            f"perplexity {report['perplexity']:.5g} ({run_dir / 'eval.json'})",
            flush=True,
        )
    except Exception as e:
        print(f"[poft-ds] eval.json not written: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def _sample_record(step: int, rows: list[int], s: dict[str, Any]) -> dict[str, Any]:
    """One step's trained samples: their data rows, target and reference scores and PoFT weights."""
    trained = [i for i, t in enumerate(s["sample_trained"]) if t > 0]
    rec: dict[str, Any] = {"step": step, "row": [rows[i] for i in trained]}
    for k in ("s_target", "s_ref", "weight"):
        rec[k] = [s[f"sample_{k}"][i] for i in trained]
    return rec


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past the checkpoint a run resumes from (they will be logged again), and a last
    line a killed run left half-written; atomically, so a crash now loses no line."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        keep = []
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # the line being written when the run died
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            if rec["step"] <= step:
                keep.append(line)
        atomic_write(path, "".join(line + "\n" for line in keep).encode())
