"""The `poft-ds` command line.

poft-ds validate job.yaml        check a spec and print it resolved (or every problem)
poft-ds schema                   the spec's JSON schema, for editors
poft-ds launch job.yaml          start every rank of a job (--dry-run prints the command)
poft-ds train job.yaml           what each rank runs (started by a launcher)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import yaml

from poft_ds.spec import JobSpec, SpecError, load_spec


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    print(yaml.safe_dump(spec.public_dump(), sort_keys=False), end="")
    roles = f"{spec.trainer_ranks} trainer ranks" + "".join(
        f", {m.ranks} for {m.name}" for m in (spec.aligned_models if spec.objective.kind == "poft" else [])
    )
    print(f"# ok: {spec.world_size} processes: {roles}; {spec.grad_accum_steps} accumulation steps", file=sys.stderr)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from poft_ds.launchers import plan_launch, run_launch

    spec = load_spec(args.spec)
    plan = plan_launch(spec, args.spec)
    for path, text in plan.files.items():
        print(f"# {path}\n{text}", end="" if text.endswith("\n") else "\n")
    print("+ " + shlex.join(plan.command), flush=True)
    if args.dry_run:
        return 0
    return run_launch(spec, plan)


def _cmd_train(args: argparse.Namespace) -> int:
    from poft_ds.job import run_rank

    spec = load_spec(args.spec)
    os.environ.update(spec.env)
    run_rank(spec)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `poft-ds` console script."""
    parser = argparse.ArgumentParser(prog="poft-ds", description="PoFT fine-tuning on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in [
        ("validate", _cmd_validate, "check a job spec and print it resolved"),
        ("launch", _cmd_launch, "start every rank of a job"),
        ("train", _cmd_train, "run this rank's part of a job (started by a launcher)"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("spec", help="job spec (YAML)")
        p.set_defaults(fn=fn)
        if name == "launch":
            p.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    sub.add_parser("schema", help="print the job spec's JSON schema").set_defaults(fn=_cmd_schema)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"poft-ds: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
