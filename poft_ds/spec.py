"""The job spec: one typed, validated description of a poft-ds run.

Every number a user sets lives here. The spec is loaded from YAML, `${VAR}` references are
filled from the environment, relative paths are resolved against the spec file's folder, and
cross-field rules (batch arithmetic, topology) are checked in one place so that a bad spec
fails before any rank starts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from poft_ds import SHIPPED_ROOT

DEFAULT_MAX_LENGTH = 1024


class SpecError(ValueError):
    """A job spec that cannot be run; the message lists every problem with its field path."""


class _Strict(BaseModel):
    # Unknown keys are mistakes (typos, options from another trainer), never silently ignored; an
    # infinite or NaN number (`.inf`, `.nan` in YAML) is never a meaningful setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


# An Adam beta: 1 would make the moment estimates never forget (and the bias correction divide by 0).
_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class ModelSpec(_Strict):
    """A causal language model: where it lives and how a conversation becomes tokens."""

    path: str = Field(
        min_length=1,
        description="Local model directory (config, weights, tokenizer), or a Hugging Face hub id (org/name) "
        "already in the local hub cache (HF_HOME / HF_HUB_CACHE); nothing is downloaded. A local directory "
        "of that name wins.",
    )
    revision: str | None = Field(
        None,
        min_length=1,
        description="For a hub id: the branch, tag or commit to load (default main). The resolved spec "
        "records the commit it resolved to.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template overriding the tokenizer's own (a string or a .jinja file).",
    )
    max_length: int | None = Field(
        None,
        gt=1,
        description="Maximum tokens per sample, prompt included (target default 1024; aligned models: the target's).",
    )
    truncation: Literal["right", "left", "drop"] = Field(
        "right",
        description="Longer samples: keep the first max_length tokens, the last ones, or drop the sample.",
    )
    trust_remote_code: bool = Field(False, description="Allow code shipped with the model to run.")
    head_chunk_tokens: int = Field(
        2048,
        ge=1,
        description="Response positions per output-head chunk: bounds float32 logits at chunk x vocabulary.",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = Field(
        None,
        description="Attention kernel (transformers' attn_implementation); None: transformers' default. "
        "Packed batches need one that honours packed position_ids: flash_attention_2 (varlen) on GPUs, "
        "sdpa or eager (a block-diagonal mask) anywhere.",
    )

    # The hub id `path` named before validation pointed it at the snapshot folder in the cache.
    _hub_id: str | None = PrivateAttr(None)

    @property
    def hub_id(self) -> str | None:
        """The hub id this model was named by, or None for a local directory."""
        return self._hub_id


class AlignedModelSpec(ModelSpec):
    """A frozen aligned (reference) model that scores every sample on its own ranks."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Short name used in metrics and logs.")
    ranks: int = Field(1, ge=1, description="Reference ranks serving this model (ZeRO-3 shards it over them).")
    score_batch_size: int = Field(8, ge=1, description="Samples per scoring forward pass on one rank.")
    max_tokens_per_batch: int | None = Field(
        None,
        ge=2,
        description="Pack scoring batches padding-free to this many tokens (replaces score_batch_size); "
        "at least this model's max_length.",
    )
    allow_cross_node: bool = Field(False, description="Let this model's rank group span nodes.")


class SourceSpec(_Strict):
    """One data file and how to read it."""

    path: str = Field(min_length=1, description="JSONL, JSON, CSV/TSV, parquet or arrow file.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="Row format; `auto` detects it row by row."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Format field -> column name, e.g. {messages: chat, id: uid}."
    )
    weight: float = Field(1.0, gt=0.0, description="Times each row is used per epoch (fractions sample).")


class DataSpec(_Strict):
    """Training data: one or more sources, each a path or a mapping with format, columns, weight."""

    train_files: list[str | SourceSpec] = Field(min_length=1, description="Data sources (a mixture when several).")
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Refuse to start when more than this fraction of rows is unusable (0: any bad row stops "
        "the job). Up to it, unusable rows are skipped and each is reported by file:line in data_report/.",
    )
    reference_score_column: str | None = Field(
        None,
        description="Column with precomputed reference scores (e.g. mean_log_llm_probs); PoFT then needs no aligned models.",
    )
    cache_dir: str | None = Field(
        None, description="Tokenization cache, keyed by content (default: <run_dir>/cache/tokenized)."
    )
    filter_min_score: float | None = Field(
        None, description="Train only on samples whose s_ref is at least this (scores from the store or column)."
    )
    filter_min_quantile: float | None = Field(
        None, ge=0.0, lt=1.0, description="Train only on samples whose s_ref is at least this quantile of s_ref."
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Seeded fraction of usable rows held out for evaluation."
    )
    group_by_length: bool = Field(
        True, description="Inside each global batch, put samples of similar length in the same micro-batch."
    )

    def resolved_cache_dir(self, run_dir: str) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(run_dir) / "cache" / "tokenized"

    @property
    def sources(self) -> list[SourceSpec]:
        return [SourceSpec(path=f) if isinstance(f, str) else f for f in self.train_files]


class ObjectiveSpec(_Strict):
    """What the target model is trained to do."""

    kind: Literal["poft", "sft", "dpo"] = Field(
        "poft",
        description="`poft` (needs aligned models), plain `sft`, or `dpo` on preference pairs (its reference "
        "model is aligned_models' one entry, by default the target's starting weights).",
    )
    beta: float | None = Field(
        None,
        gt=0.0,
        description="PoFT: scale on the score margin (default 1, the paper's); DPO: strength of the pull to the "
        "reference (default 0.1, TRL's).",
    )
    gamma: float = Field(0.0, description="PoFT offset added to the margin (paper: 0).")
    aggregation: Literal["mean", "min", "max"] = Field(
        "mean", description="How the K aligned models' scores combine into s_ref (paper: mean)."
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="DPO: `sigmoid` (the DPO paper) or `ipo` (on mean log-probabilities), as TRL names them."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="DPO (sigmoid): assumed fraction of flipped preferences (conservative DPO)."
    )

    @property
    def uses_reference(self) -> bool:
        """Whether reference ranks (or stored or precomputed reference scores) feed the loss."""
        return self.kind in ("poft", "dpo")


class TrainingSpec(_Strict):
    """Optimisation: steps, batch arithmetic, learning rate."""

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to train; overrides epochs (cycling through the data as needed)."
    )
    learning_rate: float = Field(1e-6, gt=0.0, description="Peak learning rate (paper: 1e-6 for 7B PoFT).")
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="Adam's (beta1, beta2), each in [0, 1).")
    adam_eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    micro_batch_size: int = Field(1, ge=1, description="Samples per forward pass on one trainer rank.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=2,
        description="Pack micro-batches padding-free to this many tokens by bin-packing each global batch "
        "(replaces micro_batch_size; every trainer runs as many passes); at least model.max_length.",
    )
    global_batch_size: int = Field(8, ge=1, description="Samples per optimizer step over all trainer ranks.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="Derived from the batch sizes; when set it must agree with them."
    )
    gradient_checkpointing: bool = False
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A non-finite loss: stop before the update, or leave it out of the step (the whole step "
        "when it made the gradients non-finite) and count it.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="`auto`: bf16 on GPUs that support it, fp32 otherwise (CPU)."
    )


class TopologySpec(_Strict):
    """How many processes the job has; roles are derived from it, never set per process."""

    # Bounds far above any real machine, so that a typo (100000) is named as such and not as a
    # batch-divisibility problem.
    nodes: int = Field(1, ge=1, le=4096)
    procs_per_node: int = Field(
        ge=1, le=1024, description="Processes on each node (trainer and reference ranks together)."
    )
    bind_cores: bool = Field(
        False,
        description="CPU runs: pin each process to its own cores (local rank r gets cores [r*t, (r+1)*t) of those "
        "the launch may use, t = OMP_NUM_THREADS, else cores / procs_per_node), as DeepSpeed's "
        "--bind_cores_to_rank: no rank migrates between cores or shares one with another rank. Ignored on GPUs.",
    )


class DeepSpeedSpec(_Strict):
    """DeepSpeed JSON configs; the spec writes its batch sizes and precision into them."""

    train_config: str = Field("zero3.json", description="Trainer config (a file, or a name in ds_configs/).")
    reference_config: str = Field("zero3_inference.json", description="Reference-rank inference config.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Merged into the trainer config.")


class ReferenceSpec(_Strict):
    """How reference ranks feed scores to the trainers."""

    prefetch_steps: int = Field(2, ge=1, description="Optimizer steps reference ranks may score ahead.")
    mode: Literal["auto", "online", "store"] = Field(
        "auto",
        description="online: reference ranks score while the trainers train; store: no reference ranks, "
        "every score comes from the score store (the launch refuses when one is missing); auto: store when "
        "`poft-ds launch` finds every score of the schedule in the store, else online.",
    )


class TimeoutsSpec(_Strict):
    """How long a rank waits for its peers, by what it waits for, before the job fails naming the wait.

    Defaults are sized for 7B models on real data: loading a sharded 7B model or tokenizing
    200,000 rows under one model's template takes many minutes, a ZeRO-3 checkpoint of a 7B
    model with its optimizer state several.
    """

    startup_s: float = Field(
        3600.0, gt=0.0, description="Rendezvous, data preparation, model loading and the first step's scores."
    )
    step_s: float = Field(1800.0, gt=0.0, description="One step's scores to arrive (or be taken by a trainer).")
    checkpoint_s: float = Field(
        3600.0, gt=0.0, description="Writing one checkpoint or the final model, which peers wait through."
    )

    @property
    def longest(self) -> float:
        return self.startup_s + self.step_s + 2 * self.checkpoint_s


class ScoreStoreSpec(_Strict):
    """Where reference scores are kept so that no score is ever computed twice."""

    enabled: bool = Field(
        True,
        description="Keep reference scores (false: the reference ranks score every sample of every run and "
        "epoch, and nothing is read from or written to the store).",
    )
    dir: str | None = Field(
        None, description="Store directory; share it between runs (default: <run_dir>/score_store)."
    )
    flush_every_steps: int = Field(10, ge=1, description="Online: write new scores every N optimizer steps.")
    flush_every_batches: int = Field(16, ge=1, description="Offline (poft-ds score): write every N batches.")

    def resolved_dir(self, run_dir: str) -> Path:
        return Path(self.dir) if self.dir else Path(run_dir) / "score_store"


class CheckpointSpec(_Strict):
    every_steps: int = Field(100, ge=1, description="Write a DeepSpeed checkpoint every N optimizer steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted after a new one is complete.")
    resume: Literal["auto", "required", "never"] = Field(
        "auto", description="auto: continue from the newest usable checkpoint in run_dir when there is one."
    )
    save_final_model: bool = Field(True, description="Export a Hugging Face model directory at the end.")
    allow_schedule_change: bool = Field(
        False,
        description="Resume even when the data, seed, batch sizes or filters differ from the checkpoint's "
        "(the sample order then differs from an uninterrupted run).",
    )


class LoggingSpec(_Strict):
    every_steps: int = Field(1, ge=1)
    eval_every_steps: int = Field(
        100, ge=1, description="Evaluate on the held-out rows (data.eval_fraction) every N steps and at the end."
    )
    dump_scores: bool = Field(
        False, description="Write every sample's target and per-model scores to scores/trainer<N>.jsonl."
    )
    heartbeat_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds between a rank's heartbeats (RUN_DIR/heartbeats/); `poft-ds status` calls a rank "
        "dead after three missed beats (at least 30 s).",
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description=(
            "Also send the metrics to these trackers, as the Hugging Face Trainer's report_to does; "
            "RUN_DIR/metrics.jsonl is always written. TensorBoard logs go to RUN_DIR/tensorboard/<run_name>. "
            "W&B reads its own environment variables: WANDB_PROJECT (default poft-ds), WANDB_ENTITY, WANDB_DIR "
            "(default RUN_DIR) and WANDB_MODE; with WANDB_MODE unset poft-ds runs W&B offline (no network during "
            "the run; upload afterwards with `wandb sync RUN_DIR/wandb/offline-run-*`)."
        ),
    )
    run_name: str | None = Field(
        None,
        description="W&B run name and TensorBoard subfolder; default: the run directory's name.",
    )

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, report_to: list[str]) -> list[str]:
        # Checked here, not when rank 0 starts logging, so `poft-ds validate` catches it before a job is queued.
        missing = [name for name in report_to if find_spec(name) is None]
        if missing:
            raise ValueError("; ".join(f"{name!r} needs the {name} package: pip install {name}" for name in missing))
        return report_to

    @field_validator("run_name")
    @classmethod
    def _one_folder_name(cls, run_name: str | None) -> str | None:
        # The name is also a folder under RUN_DIR/tensorboard: it must not reach outside it.
        if run_name is not None and (run_name in ("", ".", "..") or "/" in run_name or "\\" in run_name):
            raise ValueError(f"{run_name!r} is not usable as a folder name (no '/', '\\', '.', '..' or empty name)")
        return run_name


class DeepSpeedLauncherSpec(_Strict):
    """Options of the `deepspeed` launcher (multi-node through pdsh, OpenMPI, ...)."""

    hosts: list[str] = Field(
        default_factory=list, description="Node host names, in rank order; rendered into a hostfile."
    )
    hostfile: str | None = Field(None, description="An existing DeepSpeed hostfile ('host slots=N' lines).")
    backend: Literal["pdsh", "openmpi", "mpich", "mvapich", "impi", "slurm"] = Field(
        "pdsh", description="How the deepspeed launcher reaches the other nodes."
    )
    ssh_port: int | None = Field(None, ge=1, le=65535)
    launcher_args: str = Field("", description="Passed to the backend (deepspeed --launcher_args).")


class SlurmLauncherSpec(_Strict):
    """Options of the `slurm` launcher: the sbatch script rendered from launch/slurm.sbatch.j2."""

    partition: str | None = None
    account: str | None = None
    time: str | None = Field(None, pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$", description="Wall time, e.g. 2-00:00:00.")
    gres: str | None = Field(None, description="Generic resources per node, e.g. gpu:8.")
    overcommit: bool = Field(False, description="Allow more tasks than CPUs (small test nodes).")
    extra_sbatch: list[str] = Field(default_factory=list, description="Further #SBATCH lines, e.g. --qos=high.")
    srun_args: list[str] = Field(default_factory=list)
    job_name: str | None = Field(None, description="Defaults to the run directory's name.")
    signal_seconds: int | None = Field(
        120, ge=1, description="Slurm sends SIGUSR1 this long before the time limit: checkpoint, then requeue."
    )


class MpiLauncherSpec(_Strict):
    """Options of the `mpi` launcher (mpirun; ranks discover themselves through mpi4py)."""

    mpirun: str = "mpirun"
    hostfile: str | None = None
    args: list[str] = Field(default_factory=list, description="Extra mpirun arguments, e.g. --oversubscribe.")


# torch.distributed's customary port, for launchers that start ranks on several nodes.
DEFAULT_MASTER_PORT = 29500


class LauncherSpec(_Strict):
    """How `poft-ds launch` starts the ranks."""

    kind: Literal["local", "deepspeed", "slurm", "mpi"] = "local"
    master_addr: str | None = Field(None, description="Rendezvous host; default: this host or the first node.")
    master_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=f"Rendezvous port; default: a free port for a local launch (so two jobs on one machine never "
        f"collide), {DEFAULT_MASTER_PORT} for launchers that span nodes.",
    )
    deepspeed: DeepSpeedLauncherSpec = Field(default_factory=DeepSpeedLauncherSpec)
    slurm: SlurmLauncherSpec = Field(default_factory=SlurmLauncherSpec)
    mpi: MpiLauncherSpec = Field(default_factory=MpiLauncherSpec)

    @property
    def fixed_port(self) -> int:
        """The rendezvous port of a launch that spans nodes: `master_port`, else the customary 29500.

        A local launch picks a free port instead when `master_port` is unset (`launchers.plan_launch`).
        """
        return self.master_port or DEFAULT_MASTER_PORT


class EvalSpec(_Strict):
    """How `poft-ds eval` scores a model on held-out data and checks its greedy answers."""

    answer_field: str | None = Field(
        None,
        description="Row field holding the expected answer to the last assistant turn; None: no exact match "
        "(only log-probability, cross-entropy and perplexity are reported).",
    )
    checker: str = Field(
        "exact",
        description="How a greedy generation is compared with the answer: `exact` (equal after stripping "
        "whitespace), `contains` (the answer appears in the generation), or `module.path:function`, a function "
        "(generation: str, answer: str, row: dict) -> bool.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per answer (greedy decoding).")
    batch_size: int = Field(8, ge=1, description="Samples per forward pass, for scoring and for generation.")

    @field_validator("checker")
    @classmethod
    def _checker_exists(cls, checker: str) -> str:
        # Imported now, so that a typo fails `poft-ds validate`, not the end of an evaluation.
        if checker not in ("exact", "contains"):
            EvalSpec.user_checker(checker)
        return checker

    @staticmethod
    def user_checker(checker: str) -> Callable[[str, str, dict[str, Any]], bool]:
        """The function a `module.path:function` checker names, imported.

        Raises:
            ValueError: when the name has another form, or the module or function cannot be found.
        """
        from importlib import import_module

        module, _, name = checker.partition(":")
        if not module or not name.isidentifier():
            raise ValueError(f"{checker!r} is neither 'exact', 'contains' nor 'module.path:function'")
        try:
            found = getattr(import_module(module), name, None)
        except Exception as e:  # the user's module may fail to import in any way; its reason is the message
            raise ValueError(f"cannot import module {module!r}: {type(e).__name__}: {e}") from None
        if not callable(found):
            raise ValueError(f"module {module!r} has no function {name!r}")
        return found


class JobSpec(_Strict):
    """A whole poft-ds job."""

    run_dir: str = Field(min_length=1, description="Where metrics, checkpoints and the final model go.")
    seed: int = Field(1234, ge=0, lt=2**64, description="Seeds every RNG (torch accepts 0 <= seed < 2**64).")
    model: ModelSpec
    aligned_models: list[AlignedModelSpec] = Field(default_factory=list)
    data: DataSpec
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    topology: TopologySpec
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    timeouts: TimeoutsSpec = Field(default_factory=TimeoutsSpec)
    score_store: ScoreStoreSpec = Field(default_factory=ScoreStoreSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec, description="`poft-ds eval`: answer checking and batch size.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for every rank.")

    # Fields whose YAML held ${VAR}: written back in that form, so secrets never reach disk or logs.
    _templated: dict[str, str] = PrivateAttr(default_factory=dict)

    def public_dump(self) -> dict[str, Any]:
        """The resolved spec as plain data, with every `${VAR}` value shown as its reference."""
        data = self.model_dump(mode="json")
        # A hub model is written as its id and the commit it resolved to: a spec that loads anywhere
        # with that cache, and says exactly which weights ran.
        models = [(data["model"], self.model)] + list(zip(data["aligned_models"], self.aligned_models))
        for dumped, m in models:
            if m.hub_id is not None:
                dumped["path"] = m.hub_id
        for dotted, raw in self._templated.items():
            node: Any = data
            *parents, leaf = _split_path(dotted)
            try:
                for p in parents:
                    node = node[p]
                node[leaf] = raw
            except (KeyError, IndexError, TypeError):
                continue
        return data

    @property
    def store_only(self) -> bool:
        """Whether the job starts no reference ranks: every score comes from the score store."""
        return self.objective.kind == "poft" and self.reference.mode == "store" and bool(self.aligned_models)

    @property
    def world_size(self) -> int:
        """Processes the launch starts (the topology's, less the reference ranks a store-only job drops)."""
        return self.topology.nodes * self.topology.procs_per_node - (self.topology_reference_ranks * self.store_only)

    @property
    def launched_procs_per_node(self) -> int:
        return self.world_size // self.topology.nodes

    @property
    def topology_reference_ranks(self) -> int:
        return sum(m.ranks for m in self.aligned_models) if self.objective.uses_reference else 0

    @property
    def reference_ranks(self) -> int:
        return 0 if self.store_only else self.topology_reference_ranks

    @property
    def trainer_ranks(self) -> int:
        """Trainer ranks: the topology's processes less the aligned models' ranks (store-only jobs too)."""
        return self.topology.nodes * self.topology.procs_per_node - self.topology_reference_ranks

    @property
    def grad_accum_steps(self) -> int:
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * max(self.trainer_ranks, 1))

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        _fill_defaults(self)
        problems = _cross_field_problems(self, bad=set())
        if problems:
            raise ValueError("; ".join(p.strip() for p in problems))
        return self


DPO_REFERENCE = "reference"


def _fill_defaults(spec: JobSpec) -> None:
    """Defaults that depend on other fields: the objective's beta, DPO's reference model, lengths."""
    if spec.objective.beta is None:
        spec.objective.beta = 0.1 if spec.objective.kind == "dpo" else 1.0
    if spec.objective.kind == "dpo" and not spec.aligned_models:
        # DPO's reference policy is, by default, the policy's starting point: the target as loaded.
        m = spec.model
        same = ("path", "revision", "chat_template", "max_length", "truncation", "trust_remote_code")
        spec.aligned_models = [
            AlignedModelSpec(name=DPO_REFERENCE, **{f: getattr(m, f) for f in same}),
        ]
    # Aligned models score the same samples as the target: by default over the same length.
    if spec.model.max_length is None:
        spec.model.max_length = DEFAULT_MAX_LENGTH
    for m in spec.aligned_models:
        if m.max_length is None:
            m.max_length = spec.model.max_length


def _batch_arithmetic_ok(spec: JobSpec) -> bool:
    t = spec.training
    return spec.trainer_ranks >= 1 and t.global_batch_size % (t.micro_batch_size * spec.trainer_ranks) == 0


def _cross_field_problems(spec: JobSpec, bad: set[str]) -> list[str]:
    """Every rule spanning several fields, as `  field: message` lines.

    Args:
        spec: The spec; sections named in `bad` failed validation and may be absent.
        bad: Top-level fields that failed validation: a rule reading one of them is skipped, so
            that one mistake is not reported again as the consequences it has elsewhere.
    """

    def have(*sections: str) -> bool:
        return not bad.intersection(sections)

    problems: list[str] = []
    if have("aligned_models"):
        names = [m.name for m in spec.aligned_models]
        if len(set(names)) != len(names):
            problems.append(f"aligned_models: names must be unique, got {names}")
    if have("objective", "aligned_models", "data"):
        if spec.objective.kind == "poft" and not spec.aligned_models and not spec.data.reference_score_column:
            problems.append(
                "aligned_models: objective.kind 'poft' needs at least one aligned model "
                "(or data.reference_score_column with precomputed scores)"
            )
        if spec.aligned_models and spec.data.reference_score_column:
            problems.append("data.reference_score_column: precomputed scores replace aligned_models; set only one")
    store_off = have("score_store", "reference", "data", "objective") and not spec.score_store.enabled
    if store_off and spec.objective.kind == "poft":
        # Without the store, scores exist only while the reference ranks compute them.
        if spec.reference.mode == "store":
            problems.append("reference.mode: 'store' trains from stored scores, but score_store.enabled is false")
        for name in ("filter_min_score", "filter_min_quantile"):
            if getattr(spec.data, name) is not None and not spec.data.reference_score_column:
                problems.append(f"data.{name}: filters by stored scores, but score_store.enabled is false")
    if have("objective", "aligned_models", "data") and spec.objective.kind == "dpo":
        if len(spec.aligned_models) > 1:
            problems.append(
                f"aligned_models: DPO has one reference model, got {len(spec.aligned_models)} "
                "(leave aligned_models out to use the target's starting weights)"
            )
        if spec.data.reference_score_column:
            problems.append(
                "data.reference_score_column: DPO's reference log-probabilities come from its reference model"
            )
        for name in ("filter_min_score", "filter_min_quantile"):
            if getattr(spec.data, name) is not None:
                problems.append(f"data.{name}: score filters are PoFT's; DPO trains on every usable pair")
    if have("objective", "aligned_models") and spec.objective.kind == "sft" and spec.aligned_models:
        problems.append(
            "aligned_models: objective.kind 'sft' uses no aligned models; remove them or use objective.kind 'poft'"
        )
    if have("topology", "aligned_models", "objective"):
        if spec.trainer_ranks < 1:
            problems.append(
                f"topology.procs_per_node: {spec.world_size} processes leave no trainer rank after "
                f"{spec.reference_ranks} reference ranks (aligned_models[*].ranks)"
            )
        elif have("training"):
            t = spec.training
            per_pass = t.micro_batch_size * spec.trainer_ranks
            if t.global_batch_size % per_pass:
                problems.append(
                    f"training.global_batch_size: {t.global_batch_size} is not divisible by "
                    f"micro_batch_size x trainer ranks = {t.micro_batch_size} x {spec.trainer_ranks}"
                )
            elif t.gradient_accumulation_steps not in (None, t.global_batch_size // per_pass):
                problems.append(
                    f"training.gradient_accumulation_steps: {t.gradient_accumulation_steps} disagrees with "
                    f"global_batch_size / (micro_batch_size x trainer ranks) = {t.global_batch_size // per_pass}"
                )
            if t.max_tokens_per_micro_batch is not None and t.micro_batch_size != 1:
                problems.append(
                    "training.micro_batch_size: packed micro-batches (max_tokens_per_micro_batch) hold as many "
                    "samples as fit; leave micro_batch_size at 1"
                )
        per_node = spec.topology.procs_per_node
        if spec.objective.uses_reference:
            first = spec.trainer_ranks
            for i, m in enumerate(spec.aligned_models):
                last = first + m.ranks - 1
                if first // per_node != last // per_node and not m.allow_cross_node:
                    problems.append(
                        f"aligned_models[{i}].ranks: {m.name}'s ranks {first}..{last} straddle nodes "
                        f"{first // per_node} and {last // per_node} (procs_per_node={per_node}); "
                        f"reorder models, change ranks, or set allow_cross_node: true"
                    )
                first = last + 1
    if have("launcher", "topology"):
        lau, nodes = spec.launcher, spec.topology.nodes
        if lau.kind == "deepspeed" and lau.deepspeed.hosts and len(lau.deepspeed.hosts) != nodes:
            problems.append(f"launcher.deepspeed.hosts: {len(lau.deepspeed.hosts)} hosts for topology.nodes={nodes}")
        if lau.kind == "deepspeed" and nodes > 1 and not (lau.deepspeed.hosts or lau.deepspeed.hostfile):
            problems.append("launcher.deepspeed.hosts: a multi-node deepspeed launch needs hosts or a hostfile")
        if lau.kind == "local" and nodes != 1:
            problems.append(
                "launcher.kind: 'local' runs on one machine; use deepspeed, slurm or mpi for topology.nodes > 1"
            )
    if have("topology", "aligned_models", "objective", "reference") and spec.store_only:
        if spec.world_size % spec.topology.nodes:
            problems.append(
                f"reference.mode: a store-only job runs its {spec.world_size} trainer ranks alone, which do not "
                f"divide over topology.nodes={spec.topology.nodes}"
            )
        if spec.data.reference_score_column:
            problems.append("reference.mode: 'store' reads the score store; data.reference_score_column replaces it")
    # A packed batch must hold the longest sample (a longer one would get a batch to itself anyway,
    # but a budget below max_length means the memory was sized for less than the data needs).
    if have("training", "model") and spec.model.max_length is not None:
        budget = spec.training.max_tokens_per_micro_batch
        if budget is not None and budget < spec.model.max_length:
            problems.append(
                f"training.max_tokens_per_micro_batch: {budget} is below model.max_length={spec.model.max_length}"
            )
    if have("aligned_models"):
        for i, m in enumerate(spec.aligned_models):
            if (
                m.max_tokens_per_batch is not None
                and m.max_length is not None
                and m.max_tokens_per_batch < m.max_length
            ):
                problems.append(
                    f"aligned_models[{i}].max_tokens_per_batch: {m.max_tokens_per_batch} is below its "
                    f"max_length={m.max_length}"
                )
    return [f"  {p}" for p in problems]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def scoring_spec(spec: JobSpec) -> JobSpec:
    """The job as `poft-ds score` runs it: only the aligned models' reference ranks, on one node.

    Filters by reference score are dropped: scoring is what fills the store they read.
    """
    topology = TopologySpec(nodes=1, procs_per_node=sum(m.ranks for m in spec.aligned_models))
    data = spec.data.model_copy(update={"filter_min_score": None, "filter_min_quantile": None})
    reference = spec.reference.model_copy(update={"mode": "online"})
    scoring = spec.model_copy(update={"topology": topology, "data": data, "reference": reference})
    scoring._templated = spec._templated
    return scoring


def _split_path(dotted: str) -> list[str | int]:
    """'a.b[2].c' -> ['a', 'b', 2, 'c']."""
    out: list[str | int] = []
    for part in dotted.split("."):
        name, *indices = part.split("[")
        out.append(name)
        out.extend(int(i.rstrip("]")) for i in indices)
    return out


def _interpolate(node: Any, where: str, missing: list[str], templated: dict[str, str]) -> Any:
    """Replace `${VAR}` in every string of a parsed YAML tree with the environment's value."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), missing, templated) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]", missing, templated) for i, v in enumerate(node)]
    if isinstance(node, str):
        if _VAR.search(node):
            templated[where] = node

        def fill(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                missing.append(f"{where}: environment variable {m.group(1)} is not set")
                return m.group(0)
            return os.environ[m.group(1)]

        return _VAR.sub(fill, node)
    return node


def _format_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """Pydantic's errors as `  field.path: message` lines; `prefix` is the section they came from."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping.

    Plain YAML keeps the last one silently, so a second `training:` block would replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys are overridden by explicit ones by design
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first given on line {first_line[key] + 1})",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line
            except TypeError:
                continue  # an unhashable key: the base class reports it
        return super().construct_mapping(node, deep)


def resolve_path(value: str, base: Path) -> str:
    """Resolve a relative path against `base` (the spec's folder); absolute paths pass through."""
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_ds_config(value: str, base: Path) -> Path:
    """Find a DeepSpeed config: relative to the spec first, then by name in the repo's ds_configs/."""
    candidate = Path(resolve_path(value, base))
    if candidate.is_file():
        return candidate
    shipped = SHIPPED_ROOT / "ds_configs" / value
    if shipped.is_file():
        return shipped
    raise SpecError(f"deepspeed: config file {value!r} not found next to the spec nor in {shipped.parent}")


def _validate_sections(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate each top-level field on its own, so one bad section leaves the others usable.

    Returns:
        The fields that validated (absent ones take their defaults later) and `  field: message`
        lines for the rest, unknown and missing fields included.
    """
    good: dict[str, Any] = {}
    problems = [f"  {k}: Extra inputs are not permitted" for k in raw if k not in JobSpec.model_fields]
    for name, field in JobSpec.model_fields.items():
        if name not in raw:
            if field.is_required():
                problems.append(f"  {name}: Field required")
            continue
        try:
            good[name] = TypeAdapter(Annotated[field.annotation, field]).validate_python(raw[name])
        except ValidationError as e:
            problems += _format_validation_error(e, name)
    return good, problems


def _looks_like_path(value: str) -> bool:
    # Template text always holds Jinja ({{ or {%); a single line without braces can only be a file.
    return value.endswith((".jinja", ".jinja2", ".j2")) or ("\n" not in value and "{" not in value)


# What `huggingface_hub` accepts as a repo id: `name` or `org/name`, no `..` or `--`.
_HUB_ID = re.compile(r"^(?!.*(\.\.|--))[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def resolve_hub_model(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder of a hub model in the local Hugging Face cache; never downloads.

    The cache is the one `huggingface_hub` uses (`HF_HUB_CACHE`, else `HF_HOME/hub`). Its folder
    name is the commit the revision (branch, tag or commit) points to.

    Raises:
        FileNotFoundError: the model, or that revision of it, is not in the cache (named in the message).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise FileNotFoundError(constants.HF_HUB_CACHE) from e


def _resolve_model_path(where: str, m: ModelSpec, base: Path) -> str | None:
    """Point `m.path` at a local folder: the directory it names, or its hub id's cached snapshot.

    Returns:
        A problem line, or None.
    """
    local = resolve_path(m.path, base)
    if Path(local).exists() or not _HUB_ID.fullmatch(m.path):
        if m.revision is not None:
            return f"  {where}.revision: applies to hub ids; {local} is a local path"
        m.path = local
        return None
    try:
        snapshot = resolve_hub_model(m.path, m.revision)
    except FileNotFoundError as e:
        rev = f" --revision {m.revision}" if m.revision else ""
        return (
            f"  {where}.path: {m.path!r} is neither a local model directory ({local}) nor a hub model "
            f"in the Hugging Face cache {e}{f' at revision {m.revision!r}' if m.revision else ''}; poft-ds "
            f"never downloads: fetch it first with `hf download {m.path}{rev}` (HF_HOME or HF_HUB_CACHE "
            "choose the cache)"
        )
    m._hub_id, m.path, m.revision = m.path, str(snapshot), snapshot.name
    return None


def _check_model_dir(where: str, m: ModelSpec, base: Path) -> list[str]:
    """Resolve a model's path and chat template file; name what is missing or unreadable."""
    problems = []
    unresolved = _resolve_model_path(where, m, base)
    if unresolved:
        return [unresolved]
    folder = Path(m.path)
    config = folder / "config.json"
    if not folder.is_dir():
        problems.append(f"  {where}.path: model directory {m.path} does not exist (poft-ds loads models locally)")
    elif not config.is_file():
        problems.append(f"  {where}.path: {m.path} has no config.json; is it a Hugging Face model directory?")
    else:
        try:
            json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            where_in = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            problems.append(f"  {where}.path: {config} is not valid JSON{where_in}: {getattr(e, 'msg', e)}")
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            problems.append(
                f"  {where}.path: {m.path} has no tokenizer (tokenizer.json, tokenizer.model or "
                "tokenizer_config.json); copy the tokenizer files next to the weights"
            )
    if m.chat_template and len(m.chat_template) < 4096 and "\n" not in m.chat_template:
        template_file = Path(resolve_path(m.chat_template, base))
        try:
            if template_file.is_file():
                m.chat_template = template_file.read_text()
            elif template_file.is_dir():
                problems.append(f"  {where}.chat_template: {template_file} is a folder, not a template file")
            elif _looks_like_path(m.chat_template):
                problems.append(
                    f"  {where}.chat_template: template file {template_file} does not exist "
                    "(template text needs Jinja, e.g. {% for message in messages %})"
                )
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"  {where}.chat_template: cannot read {template_file}: {e}")
    return problems


def _check_paths(spec: JobSpec, base: Path, bad: set[str]) -> tuple[list[str], set[str]]:
    """Resolve every path against the spec's folder and check that it exists.

    Returns:
        `  field: message` lines, and the model fields (`model`, `aligned_models[i]`) whose
        directory or template is unusable, whose template checks would only repeat the problem.
    """
    problems: list[str] = []
    broken: set[str] = set()
    if "run_dir" not in bad:
        spec.run_dir = resolve_path(spec.run_dir, base)
    if "score_store" not in bad and spec.score_store.dir:
        spec.score_store.dir = resolve_path(spec.score_store.dir, base)
    models = [] if "model" in bad else [("model", spec.model)]
    if "aligned_models" not in bad:
        models += [(f"aligned_models[{i}]", a) for i, a in enumerate(spec.aligned_models)]
    for where, m in models:
        found = _check_model_dir(where, m, base)
        if found:
            broken.add(where)
        problems += found
    if "data" not in bad:
        if spec.data.cache_dir:
            spec.data.cache_dir = resolve_path(spec.data.cache_dir, base)
        spec.data.train_files = [
            src.model_copy(update={"path": resolve_path(src.path, base)}) for src in spec.data.sources
        ]
        for i, src in enumerate(spec.data.sources):
            if Path(src.path).is_dir():
                problems.append(f"  data.train_files[{i}]: {src.path} is a folder; name the data files in it")
            elif not Path(src.path).is_file():
                problems.append(f"  data.train_files[{i}]: {src.path} does not exist")
    if "launcher" not in bad:
        for where, holder in (("launcher.deepspeed", spec.launcher.deepspeed), ("launcher.mpi", spec.launcher.mpi)):
            if holder.hostfile:
                holder.hostfile = resolve_path(holder.hostfile, base)
                if not Path(holder.hostfile).is_file():
                    problems.append(f"  {where}.hostfile: {holder.hostfile} does not exist")
    if "deepspeed" not in bad:
        for field in ("train_config", "reference_config"):
            try:
                setattr(spec.deepspeed, field, str(resolve_ds_config(getattr(spec.deepspeed, field), base)))
            except SpecError as e:
                problems.append(f"  deepspeed.{field}: {e}")
                broken.add(f"deepspeed.{field}")
    return problems, broken


def _check_deepspeed(spec: JobSpec, bad: set[str], broken: set[str]) -> list[str]:
    """Build both DeepSpeed configs as the ranks will, so that a contradiction fails here, not there."""
    from poft_ds.ds_config import reference_config, trainer_config  # it imports this module

    problems = []
    if not bad & {"deepspeed", "training"} and "deepspeed.reference_config" not in broken:
        try:
            reference_config(spec, "fp32")
        except SpecError as e:
            problems.append(f"  deepspeed.reference_config: {e}")
    # The trainer config carries the derived accumulation steps: only meaningful once they divide.
    needs = {"deepspeed", "training", "topology", "aligned_models", "objective"}
    if not bad & needs and "deepspeed.train_config" not in broken and _batch_arithmetic_ok(spec):
        try:
            trainer_config(spec, "fp32")
        except SpecError as e:
            problems.append(f"  deepspeed.train_config: {e}")
    return problems


def read_spec_file(path: Path) -> dict[str, Any]:
    """A job spec file's YAML mapping (duplicated keys refused, naming their line)."""
    try:
        with path.open() as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the job spec: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job spec is a YAML mapping, got {type(raw).__name__}")
    return raw


def load_spec(path: str | os.PathLike[str], check_templates: Callable[[JobSpec], None] | None = None) -> JobSpec:
    """Load, interpolate, validate and path-resolve a job spec, reporting every problem at once.

    Field types, cross-field rules, paths, DeepSpeed configs and (with `check_templates`) chat
    templates are all checked on whatever parsed, so that one run names every mistake.

    Args:
        path: The YAML file.
        check_templates: Raises SpecError naming each model whose template cannot be used
            (`poft_ds.preflight.check_templates`); run on the models whose directories are usable.

    Returns:
        The validated spec with absolute paths.

    Raises:
        SpecError: naming the file and every problem with its field path.
    """
    path = Path(path)
    raw = read_spec_file(path)
    if "stages" in raw:
        raise SpecError(
            f"{path}: a staged job (stages:) runs one job per stage; `poft-ds launch` and `poft-ds validate` "
            "take it, and each stage's own spec is written to <run_dir>/<stage>/job.yaml"
        )
    return spec_from_mapping(raw, path.resolve().parent, str(path), check_templates)


def spec_from_mapping(
    raw: dict[str, Any], base: Path, where: str, check_templates: Callable[[JobSpec], None] | None = None
) -> JobSpec:
    """Validate a job spec given as a YAML mapping (see `load_spec`).

    Args:
        raw: The mapping, `${VAR}` references not yet filled.
        base: The folder relative paths are resolved against.
        where: What to name in messages (the file, or a stage of it).
        check_templates: As in `load_spec`.
    """
    missing: list[str] = []
    templated: dict[str, str] = {}
    raw = _interpolate(raw, "", missing, templated)
    if missing:
        # An unset variable leaves a `${VAR}` that every later check would misreport.
        raise SpecError(f"{where}: invalid job spec:\n" + "\n".join(f"  {m}" for m in missing))
    good, problems = _validate_sections(raw)
    bad = {n for n, f in JobSpec.model_fields.items() if n not in good and (n in raw or f.is_required())}
    spec = JobSpec.model_construct(**good)  # every field given has been validated above
    spec._templated = templated
    if not bad & {"model", "aligned_models", "objective"}:
        _fill_defaults(spec)
    problems += _cross_field_problems(spec, bad)
    path_problems, broken = _check_paths(spec, base, bad)
    problems += path_problems
    problems += _check_deepspeed(spec, bad, broken)
    if check_templates is not None and not bad & {"model", "aligned_models"}:
        try:
            check_templates(spec)
        except SpecError as e:
            # A model whose directory is already reported would only fail here again, less clearly.
            problems += [
                line
                for line in str(e).splitlines()
                if line.startswith("  ") and line.strip().split(".chat_template:")[0] not in broken
            ]
    if problems:
        raise SpecError(f"{where}: invalid job spec:\n" + "\n".join(problems))
    return spec
