"""The `poft-ds` command line.

poft-ds validate job.yaml        check a spec and print it resolved (or every problem)
poft-ds schema                   the spec's JSON schema, for editors
poft-ds launch job.yaml          start every rank of a job (--dry-run prints the command)
poft-ds train job.yaml           what each rank runs (started by a launcher)
poft-ds status RUN_DIR           is a run running, finished, failed or preempted; step, ETA, stale ranks
poft-ds plot RUN_DIR             draw a run's figures into RUN_DIR/plots
poft-ds eval job.yaml --model M  a model's log-probability, perplexity and exact match on held-out data
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from poft_ds.data.rows import DataError
from poft_ds.spec import JobSpec, SpecError, load_spec, scoring_spec


def _load_checked(path: str) -> JobSpec:
    """Load a spec and prove every model's chat template can be masked, all in one report."""
    from poft_ds.preflight import check_templates

    spec = load_spec(path, check_templates=check_templates)
    for i, m in enumerate(spec.aligned_models if spec.objective.uses_reference else []):
        if m.max_length < spec.model.max_length:
            print(
                f"warning: aligned_models[{i}].max_length {m.max_length} < model.max_length {spec.model.max_length}: "
                f"{m.name} truncates responses the target keeps, so s_ref averages a shorter response than "
                "s_target (omit it to inherit the target's)",
                file=sys.stderr,
            )
    return spec


def _cmd_validate(args: argparse.Namespace) -> int:
    from poft_ds.scores import reference_plan
    from poft_ds.stages import is_staged

    if is_staged(args.spec):
        for stage, spec, _ in _checked_stages(args.spec):
            print(f"# stage {stage.name}: {stage.run_dir}")
            print(yaml.safe_dump(spec.public_dump(), sort_keys=False), end="")
        print("# ok: every stage", file=sys.stderr)
        return 0
    spec = _load_checked(args.spec)
    launch, how = reference_plan(spec)
    print(yaml.safe_dump(spec.public_dump(), sort_keys=False), end="")
    if how:
        print(f"# {how}", file=sys.stderr)
    roles = f"{spec.trainer_ranks} trainer ranks" + "".join(
        f", {m.ranks} for {m.name}" for m in (spec.aligned_models if launch.reference_ranks else [])
    )
    print(f"# ok: {launch.world_size} processes: {roles}; {spec.grad_accum_steps} accumulation steps", file=sys.stderr)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def _with_reference_plan(spec: JobSpec, spec_path: str) -> tuple[JobSpec, str]:
    """Decide whether reference ranks start (`reference.mode`) and the spec file the ranks read.

    A job that `reference.mode: auto` turns store-only launches from a copy of the resolved spec
    with `reference.mode: store` (in `<run_dir>/launch/`), so every rank agrees there are no
    reference ranks.
    """
    from poft_ds.scores import reference_plan

    launch, how = reference_plan(spec)
    if how:
        print(f"[poft-ds] {how}", flush=True)
    if launch.store_only and not spec.store_only:
        path = Path(launch.run_dir) / "launch" / "job.store.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(launch.public_dump(), sort_keys=False))
        return launch, str(path)
    return launch, spec_path


def _cmd_launch(args: argparse.Namespace) -> int:
    from poft_ds.stages import is_staged

    if is_staged(args.spec):
        return _launch_stages(args)
    return _launch_one(_load_checked(args.spec), args.spec, args)


def _launch_one(spec: JobSpec, spec_path: str, args: argparse.Namespace) -> int:
    """Start every rank of one job (print the plan only, with --dry-run); the launcher's exit code."""
    from poft_ds.launchers import plan_launch, run_launch

    spec, spec_path = _with_reference_plan(spec, spec_path)
    plan = plan_launch(spec, spec_path, extra=("--resume",) if args.resume else ())
    for path, text in plan.files.items():
        print(f"# {path}\n{text}", end="" if text.endswith("\n") else "\n")
    print("+ " + shlex.join(plan.command), flush=True)
    if args.dry_run:
        return 0
    return run_launch(spec, plan)


def _checked_stages(spec_path: str) -> list[tuple[Any, JobSpec, bool]]:
    """Every stage of a staged job with its validated spec, and whether that spec is a stand-in
    (checked against an earlier model because the previous stage's output does not exist yet);
    all are checked before any runs."""
    from poft_ds.preflight import check_templates
    from poft_ds.stages import read_stages, stage_spec

    stages, base = read_stages(spec_path)
    out = []
    for stage in stages:
        spec, note = stage_spec(stage, base, spec_path, check_templates)
        if note:
            print(f"# {note}", file=sys.stderr)
        if spec.launcher.kind == "slurm":
            raise SpecError(
                f"{spec_path}: stage {stage.name}: launcher.kind slurm: a staged job runs its stages one after "
                "another from `poft-ds launch`; run that inside an allocation (launcher.kind local or deepspeed)"
            )
        out.append((stage, spec, note is not None))
    return out


def _launch_stages(args: argparse.Namespace) -> int:
    """Run a staged job's stages in order, skipping finished ones (see `poft_ds.stages`)."""
    from poft_ds.stages import finished, mark_finished, spec_hash, stage_spec, write_stage_spec

    checked = _checked_stages(args.spec)
    base = Path(args.spec).resolve().parent
    for i, (stage, spec, stand_in) in enumerate(checked):
        if stand_in:  # validated again now that the previous stage's model exists: this is what runs
            spec, _ = stage_spec(stage, base, args.spec)
        done = finished(stage)
        if done is not None:
            if done != spec_hash(spec):
                raise SpecError(
                    f"{args.spec}: stage {stage.name} finished with another spec than the one it has now; "
                    f"remove {stage.run_dir} to run it (and the stages after it) again"
                )
            print(f"[poft-ds] stage {stage.name}: finished earlier ({stage.run_dir}); skipped", flush=True)
            continue
        print(f"[poft-ds] stage {i + 1}/{len(checked)}: {stage.name} in {stage.run_dir}", flush=True)
        code = _launch_one(spec, str(write_stage_spec(stage, spec)), args)
        if code != 0 or args.dry_run:
            return code
        if i + 1 < len(checked) and not stage.final_model.is_dir():
            raise SpecError(
                f"{args.spec}: stage {stage.name} wrote no final model, which stage {checked[i + 1][0].name} "
                "starts from (checkpoint.save_final_model)"
            )
        mark_finished(stage, spec)
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from poft_ds.preflight import inspect_data

    report = inspect_data(_load_checked(args.spec))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"rows: {report['rows']}, usable by every model: {report['usable_by_all_models']}")
    for name, m in report["models"].items():
        print(f"\n== {name} ({m['path']})")
        for outcome, n in m["outcomes"].items():
            examples = ", ".join(m["examples"].get(outcome, [])[:3])
            print(f"  {outcome:<40} {n:>8}" + (f"   e.g. {examples}" if examples else ""))
        cut = m["truncated_responses"]
        if cut["samples"]:
            print(f"  truncated by max_length: {cut['samples']} usable samples lost {cut['tokens']} response tokens")
        if m["tokens"]:
            print("  tokens: " + ", ".join(f"{k} {v:.0f}" for k, v in m["tokens"].items()))
            print("  first sample, trained tokens in [[ ]]:\n    " + m["masked_sample"].replace("\n", "\n    "))
    verdict = "would start" if report["would_start"] else "would REFUSE to start"
    print(
        f"\nbad fraction {report['bad_fraction']:.4f} (data.max_bad_fraction {report['max_bad_fraction']}): job {verdict}"
    )
    return 0 if report["would_start"] else 1


def _print_json(result: dict, out: str | None) -> int:
    """Print a benchmark's JSON result, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return 0


def _cmd_bench_padding(args: argparse.Namespace) -> int:
    from poft_ds.bench.padding import padding_efficiency

    result = padding_efficiency(global_batch=args.global_batch, score_batch_size=args.score_batch_size)
    return _print_json(result, args.out)


def _cmd_bench_scoring(args: argparse.Namespace) -> int:
    from poft_ds.bench.scoring import FULL, scoring_throughput

    # --full starts from the sizes; any option given explicitly overrides either default.
    kwargs = dict(FULL) if args.full else {}
    options = ("n_samples", "median_tokens", "max_length", "vocab_size", "hidden_size", "intermediate_size", "layers")
    options += ("heads", "kv_heads", "max_tokens", "baseline_batch_size", "chunk_tokens", "device", "dtype")
    kwargs.update({k: getattr(args, k) for k in options if getattr(args, k) is not None})
    result = scoring_throughput(**kwargs)
    return _print_json(result, args.out)


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from poft_ds.bench.data import data_bench

    result = data_bench(n_rows=args.rows, procs=args.procs, rate_rows=args.rate_rows, work=args.work)
    return _print_json(result, args.out)


def _cmd_bench_job(args: argparse.Namespace) -> int:
    from poft_ds.bench.job import BenchError, bench_job, format_table

    try:
        result = bench_job(args.spec, args.out, args.steps, args.warmup_steps, args.peak_tflops, args.repeats)
    except BenchError as e:
        print(f"poft-ds bench: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    return 0


def _cmd_scores_show(args: argparse.Namespace) -> int:
    from poft_ds.scores import scores_report

    report = scores_report(load_spec(args.spec), args.lowest, Path(args.png) if args.png else None)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _cmd_scores_export(args: argparse.Namespace) -> int:
    from poft_ds.scores import export_scores

    n = export_scores(load_spec(args.spec), Path(args.out), args.column)
    print(f"[poft-ds] {n} fully scored rows written to {args.out} (column {args.column})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from poft_ds.distributed import EXIT_PREEMPTED, Preempted
    from poft_ds.job import run_rank

    spec = load_spec(args.spec)
    if args.resume:
        spec.checkpoint.resume = "required"
    os.environ.update(spec.env)
    try:
        run_rank(spec)
    except Preempted:
        _leave_rank(EXIT_PREEMPTED)
    _leave_rank(0)


def _cmd_score_worker(args: argparse.Namespace) -> int:
    from poft_ds.job import run_rank

    spec = scoring_spec(load_spec(args.spec))
    os.environ.update(spec.env)
    run_rank(spec, offline_scoring=True)
    _leave_rank(0)


def _leave_rank(code: int) -> NoReturn:
    """End a rank that finished (or checkpointed and stopped) without the interpreter's teardown.

    Everything the rank writes is closed or flushed by then (checkpoints, metrics, heartbeat, logs,
    W&B and TensorBoard), and every rank has passed the final barrier. Python's teardown would
    then run a full garbage collection over torch's, transformers' and DeepSpeed's objects:
    measured at 7-12 s per rank on 2 CPU cores after a tiny job, during which the launcher (and a
    scheduler's allocation) waits for nothing.
    """
    import logging

    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun reports a rank that exits without it as failed (mpi4py does it at exit)
    _flush_and_exit(code)


def _flush_and_exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _cmd_score(args: argparse.Namespace) -> int:
    from poft_ds.launchers import plan_launch, run_launch

    spec = _load_checked(args.spec)
    if not spec.aligned_models or not spec.score_store.enabled:
        raise SpecError("aligned_models: offline scoring needs aligned models and score_store.enabled")
    scoring = scoring_spec(spec)
    plan = plan_launch(scoring, args.spec, command="score-worker")
    print("+ " + shlex.join(plan.command), flush=True)
    return run_launch(scoring, plan)


# `poft-ds status` exit codes, so scripts can branch on a run's state.
STATUS_EXIT = {"running": 0, "finished": 0, "preempted": 75, "failed": 1, "unknown": 3}


def _cmd_status(args: argparse.Namespace) -> int:
    from poft_ds.status import format_status, run_status

    if not Path(args.run_dir).is_dir():
        print(f"poft-ds status: {args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    status = run_status(args.run_dir, stale_after_s=args.stale_after)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return STATUS_EXIT.get(status["state"], 1)


def _cmd_eval(args: argparse.Namespace) -> int:
    from poft_ds.evaluate import evaluate_model, write_report

    report = evaluate_model(load_spec(args.spec), args.model, args.data)
    if args.out:
        write_report(report, args.out)
    em = report["exact_match"]
    print(
        f"[poft-ds] eval {report['model']} on {report['data']}: {report['evaluated']}/{report['rows']} rows, "
        f"mean log-prob {report['mean_logprob']:.5g}, cross-entropy {report['cross_entropy']:.5g}, "
        f"perplexity {report['perplexity']:.5g}"
        + (f", exact match {em:.4g} of {report['checked']} checked" if em is not None else "")
        + (f"; report: {args.out}" if args.out else "")
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from poft_ds.plot import plot_run

    try:
        paths = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"poft-ds plot: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


class _VersionAction(argparse.Action):
    """`--version`: the version and commit, computed only when asked (it imports torch)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from poft_ds.environment import version_string

        print(version_string())
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `poft-ds` console script."""
    parser = argparse.ArgumentParser(prog="poft-ds", description="PoFT fine-tuning on DeepSpeed.")
    parser.add_argument("--version", action=_VersionAction, help="print the version and git commit, then exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in [
        ("validate", _cmd_validate, "check a job spec and print it resolved"),
        ("launch", _cmd_launch, "start every rank of a job"),
        ("train", _cmd_train, "run this rank's part of a job (started by a launcher)"),
        ("score", _cmd_score, "score every sample with the aligned models into the score store (offline)"),
        ("score-worker", _cmd_score_worker, "a rank of `poft-ds score` (started by a launcher)"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("spec", help="job spec (YAML)")
        p.set_defaults(fn=fn)
        if name == "launch":
            p.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
        if name in ("launch", "train"):
            p.add_argument("--resume", action="store_true", help="fail unless a checkpoint can be resumed")
    sub.add_parser("schema", help="print the job spec's JSON schema").set_defaults(fn=_cmd_schema)
    p = sub.add_parser("status", help="a run's state, step, ETA, last metrics and checkpoint, stale ranks")
    p.add_argument("run_dir", help="the run directory (the spec's run_dir)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument(
        "--stale-after", type=float, help="seconds without a heartbeat before a rank counts as dead (3 beats, >= 30)"
    )
    p.set_defaults(fn=_cmd_status)
    p = sub.add_parser("eval", help="score a model on held-out data; greedy answers checked with eval.answer_field")
    p.add_argument("spec", help="job spec (YAML): the target's template, eval settings, held-out rows")
    p.add_argument("--model", required=True, help="a Hugging Face model folder, e.g. RUN_DIR/final_model")
    p.add_argument("--data", help="a data file (default: the rows data.eval_fraction holds out)")
    p.add_argument("--out", help="write the JSON report here")
    p.set_defaults(fn=_cmd_eval)
    p = sub.add_parser("plot", help="draw a run's figures (PNG) into RUN_DIR/plots")
    p.add_argument("run_dir", help="the run directory (the spec's run_dir)")
    p.set_defaults(fn=_cmd_plot)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="tokenize the data under every model and report what is usable")
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(fn=_cmd_data_inspect)
    scores = sub.add_parser("scores", help="stored reference scores").add_subparsers(dest="scores", required=True)
    p = scores.add_parser("show", help="distributions, agreement between models, lowest-scored samples")
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--png", help="draw a histogram of each model's scores here")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--lowest", type=int, default=10, help="how many lowest-scored samples to list")
    p.set_defaults(fn=_cmd_scores_show)
    p = scores.add_parser("export", help="write the scored data set (trains via data.reference_score_column)")
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--out", required=True, help="a .parquet or .jsonl file")
    p.add_argument("--column", default="mean_log_llm_probs", help="name of the s_ref column")
    p.set_defaults(fn=_cmd_scores_export)
    bench = sub.add_parser("bench", help="benchmarks (JSON results)").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("padding", help="real / processed tokens of scoring and training batches")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--score-batch-size", type=int, default=8)
    p.set_defaults(fn=_cmd_bench_padding)
    p = bench.add_parser("scoring", help="poft-ds's scorer against pad-to-max-length float32 logits")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--full", action="store_true", help="the issue's sizes (cap 4096, 1B-shaped model; a GPU)")
    p.add_argument("--samples", dest="n_samples", type=int, help="synthetic samples (default 48)")
    p.add_argument("--median-tokens", type=int, help="median sample length (default 200, --full 800)")
    p.add_argument("--max-length", type=int, help="length cap and baseline padding width (default 1024)")
    p.add_argument("--vocab-size", type=int, help="model vocabulary (default 32000, --full 128256)")
    for flag, default in (("--hidden-size", 128), ("--intermediate-size", 512), ("--layers", 2), ("--heads", 4)):
        p.add_argument(flag, type=int, help=f"model shape (default {default})")
    p.add_argument("--kv-heads", type=int, help="model shape (default: --heads)")
    p.add_argument("--max-tokens", type=int, help="poft-ds packed-batch token budget (default 4096)")
    p.add_argument("--batch-size", dest="baseline_batch_size", type=int, help="baseline samples per pass (4)")
    p.add_argument("--chunk-tokens", type=int, help="poft-ds output-head chunk (default 2048)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.set_defaults(fn=_cmd_bench_scoring)
    p = bench.add_parser("data", help="tokenized cache: size on disk, memory per rank, tokenization rate")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic conversations (median 800 tokens)")
    p.add_argument("--procs", type=int, help="tokenizing processes (default POFT_DS_TOKENIZE_PROCS or CPUs, max 8)")
    p.add_argument("--rate-rows", type=int, default=2000, help="rows tokenized with 1 and N processes for the rate")
    p.add_argument("--work", help="folder for the data, tokenizer and cache, kept (default: temporary)")
    p.set_defaults(fn=_cmd_bench_data)
    p = bench.add_parser("job", help="a job spec as SFT, PoFT online and PoFT from the score store: PoFT's cost")
    p.add_argument("spec", help="a PoFT job spec (YAML); `poft-ds bench job.yaml` is short for this")
    p.add_argument("--out", help="JSON result; its folder holds the runs (default <run_dir>/bench/bench.json)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (overrides training.max_steps)")
    p.add_argument("--warmup-steps", type=int, default=2, help="leading steps left out of throughput figures")
    p.add_argument("--peak-tflops", type=float, help="one accelerator's peak TFLOP/s for MFU (default: known GPUs)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the three runs; medians (for noisy machines)")
    p.set_defaults(fn=_cmd_bench_job)
    argv = list(sys.argv[1:] if argv is None else argv)
    # A user's `eval.checker: mychecks:is_correct` imports from the working folder, as `python -m` would
    # (appended, so nothing there shadows an installed package).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    spec_first = len(argv) > 1 and (argv[1].endswith((".yaml", ".yml")) or os.path.isfile(argv[1]))
    if argv[:1] == ["bench"] and spec_first and argv[1] not in bench.choices:
        argv.insert(1, "job")  # `poft-ds bench job.yaml`: a spec, not a benchmark's name
    args = parser.parse_args(argv)
    if "DS_ACCELERATOR" not in os.environ and args.command not in ("status", "plot", "schema"):
        # Named, DeepSpeed does not guess; guessing, it prints a warning on stdout, which would
        # spoil output meant for files (`poft-ds validate job.yaml > resolved.yaml`).
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return args.fn(args)
    except (SpecError, DataError) as e:
        print(f"poft-ds: {e}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The `poft-ds` program: `main()`, then an exit without the interpreter's teardown.

    Exit handlers still run (logging, temporary folders, child-process clean-up); what is skipped
    is Python's final garbage collection and module teardown, 2-4 s on 2 CPU cores for a process
    that imported torch, transformers and DeepSpeed, spent after the work is done at the end of
    every `launch`, `validate` or `score`. An exception, or argparse's own exit, leaves as usual.
    """
    code = main()
    atexit._run_exitfuncs()  # CPython's exit handlers, as a normal exit would run them
    _flush_and_exit(code)


if __name__ == "__main__":
    run()
