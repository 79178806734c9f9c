"""Does PoFT beat SFT on noisy data? Everything through poft-ds's CLI: python run.py [--work DIR].

1. `build.py`: the task's data (40% of the training responses corrupted), tokenizers, random models.
2. Two aligned models trained by poft-ds SFT on clean data: A (target's tokenizer, ChatML) and
   B (another tokenizer, zephyr); their `final_model/` folders are PoFT's aligned models.
3. `poft-ds score`: both aligned models score the training set once into a shared score store, so
   every PoFT run reads its scores from the store (`reference.mode: auto`) and starts no reference rank.
4. For each seed x {sft, poft} x learning rate: train on the noisy set, `poft-ds eval` on the clean
   held-out facts (greedy answer, exact match; mean log-prob of the correct answer).
5. `results.json` and `results.md`: per seed and method, the learning rate with the best exact match
   on the `valid` half of the held-out facts (ties: mean log-prob), and at that learning rate the
   exact match and mean log-prob on the `test` half; for PoFT, the mean per-sample weight on clean
   and on corrupted training rows (samples.jsonl joined to the rows' `corrupted` flag).

Two launches run side by side (one process each, one CPU thread each) on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build import build  # noqa: E402  (the builder lives next to this script)

from poft_ds.files import atomic_write  # noqa: E402

SEEDS = (1, 2)
METHODS = ("sft", "poft")
LEARNING_RATES = (1.0e-3, 3.0e-3, 1.0e-2)
STEPS = 1000  # ~32 epochs of the 495 training rows at 16 per step: enough to memorize the facts
ALIGNED_STEPS = 1000
PARALLEL = 2

# One template for every run: run.py fills `run_dir`, `seed`, the model, data and objective.
TEMPLATE: dict[str, Any] = {
    "model": {"max_length": 64},
    "training": {
        "max_steps": STEPS,
        "learning_rate": 3.0e-3,
        "warmup_ratio": 0.05,
        "global_batch_size": 16,
        "max_tokens_per_micro_batch": 512,  # padding-free: a step's 16 samples in one packed row
    },
    "topology": {"procs_per_node": 1},
    "checkpoint": {"every_steps": 100000, "save_final_model": True, "keep_last": 1},
    "logging": {"every_steps": 10},
    "eval": {"answer_field": "answer", "checker": "exact", "max_new_tokens": 8, "batch_size": 64},
    "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}


def _spec(work: Path, name: str, **fields: Any) -> Path:
    """Write the template, updated with `fields` (one level deep), as `work/specs/<name>.yaml`."""
    spec = json.loads(json.dumps(TEMPLATE))
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    spec["run_dir"] = str(work / "runs" / name)
    path = work / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(spec, sort_keys=False).encode())
    return path


def _cli(args: list[str], log: Path) -> None:
    """Run `python -m poft_ds.cli ARGS`, its output into `log`; a failure stops the script naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.call([sys.executable, "-m", "poft_ds.cli", *args], stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"poft-ds {' '.join(args)} failed (exit {rc}); see {log}:\n{tail}")


def _train_and_eval(work: Path, name: str, spec: Path, heldout: Path, port: int) -> dict[str, Any]:
    """Launch one run (unless its final model exists) and evaluate it; the eval report."""
    run_dir = work / "runs" / name
    if not (run_dir / "final_model" / "config.json").is_file():
        _cli(["launch", str(spec)], work / "logs" / f"{name}.launch.log")
    report = work / "eval" / f"{name}.json"
    if not report.is_file():
        _cli(
            ["eval", str(spec), "--model", str(run_dir / "final_model"), "--data", str(heldout), "--out", str(report)],
            work / "logs" / f"{name}.eval.log",
        )
    return json.loads(report.read_text())


def _by_split(report: dict[str, Any], heldout_rows: list[dict]) -> dict[str, dict[str, float]]:
    """Exact match and mean log-prob per held-out split, from the eval report's per-sample records."""
    out: dict[str, dict[str, float]] = {}
    for split in ("valid", "test"):
        recs = [r for r in report["samples"] if heldout_rows[int(r["row"].rsplit(":", 1)[1]) - 1]["split"] == split]
        out[split] = {
            "exact_match": sum(r["correct"] is True for r in recs) / len(recs),
            "mean_logprob": sum(r["s"] for r in recs) / len(recs),
            "n": len(recs),
        }
    return out


def _poft_weights(run_dir: Path, train_rows: list[dict]) -> dict[str, Any]:
    """Mean PoFT weight of the logged samples, on clean and on corrupted rows (and per corruption kind)."""
    sums: dict[str, list[float]] = {}
    with open(run_dir / "samples.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            for row, w in zip(rec["row"], rec["weight"]):
                r = train_rows[row]
                for group in ("corrupted" if r["corrupted"] else "clean", f"kind:{r['corruption']}" * r["corrupted"]):
                    if group:
                        sums.setdefault(group, []).append(w)
    return {g: {"mean_weight": sum(ws) / len(ws), "samples": len(ws)} for g, ws in sorted(sums.items())}


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Noisy SFT: PoFT vs SFT",
        "",
        f"Training set: {results['train_rows']} rows, {results['corrupted_rows']} corrupted "
        f"({results['corruption_rate']:.0%}); held-out facts: {results['valid_facts']} valid, "
        f"{results['test_facts']} test (all clean). {STEPS} steps of 16 samples per run.",
        "Best learning rate per seed and method: highest exact match on the valid facts, ties by mean log-prob.",
        "",
        "| seed | method | best lr | test exact match | test mean log-prob | valid exact match | "
        "PoFT weight clean | PoFT weight corrupted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed in SEEDS:
        for method in METHODS:
            b = results["best"][str(seed)][method]
            w = b.get("weights", {})
            lines.append(
                f"| {seed} | {method} | {b['lr']:g} | {_fmt(b['test']['exact_match'])} | "
                f"{_fmt(b['test']['mean_logprob'])} | {_fmt(b['valid']['exact_match'])} | "
                f"{_fmt(w.get('clean', {}).get('mean_weight'))} | {_fmt(w.get('corrupted', {}).get('mean_weight'))} |"
            )
    lines += [
        "",
        "All runs (valid / test exact match):",
        "",
        "| seed | method | lr | valid EM | test EM | test log-prob |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for r in results["runs"]:
        lines.append(
            f"| {r['seed']} | {r['method']} | {r['lr']:g} | {_fmt(r['valid']['exact_match'])} | "
            f"{_fmt(r['test']['exact_match'])} | {_fmt(r['test']['mean_logprob'])} |"
        )
    a = results["aligned"]
    lines += [
        "",
        f"Aligned models on all held-out facts (exact match, each under its own tokenizer and template): "
        f"A (ChatML) {_fmt(a['a']['exact_match'])}, B (zephyr) {_fmt(a['b']['exact_match'])}. "
        "Untrained target: "
        f"{_fmt(results['untrained_target']['exact_match'])}.",
        f"Wall time: {results['wall_time_s'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE.parent.parent / "runs" / "noisy_sft"), help="work folder")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    start = time.monotonic()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    assets = work / "assets"
    if not (assets / "target" / "config.json").is_file():
        build(assets)
    data = assets / "data"
    train_rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    heldout_rows = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines()]
    heldout = data / "heldout.jsonl"
    print(f"[noisy_sft] assets in {assets}", flush=True)

    # Aligned models: SFT on clean data through poft-ds, side by side.
    aligned_steps = {"training": {"max_steps": ALIGNED_STEPS, "learning_rate": 3.0e-3}}
    specs = {
        "a": _spec(
            work,
            "aligned_a",
            model={"path": str(assets / "aligned_a_init")},
            data={"train_files": [str(data / "aligned.jsonl")]},
            objective={"kind": "sft"},
            launcher={"master_port": 29610},
            **aligned_steps,
        ),
        "b": _spec(
            work,
            "aligned_b",
            model={"path": str(assets / "aligned_b_init")},
            data={"train_files": [str(data / "aligned.jsonl")]},
            objective={"kind": "sft"},
            launcher={"master_port": 29611},
            **aligned_steps,
        ),
    }
    with ThreadPoolExecutor(PARALLEL) as pool:
        aligned_reports = dict(
            zip(specs, pool.map(lambda k: _train_and_eval(work, f"aligned_{k}", specs[k], heldout, 0), specs))
        )
    print(f"[noisy_sft] aligned models trained ({time.monotonic() - start:.0f} s)", flush=True)

    # The untrained target, as a floor.
    base_spec = _spec(
        work,
        "untrained",
        model={"path": str(assets / "target")},
        data={"train_files": [str(data / "train.jsonl")]},
        objective={"kind": "sft"},
    )
    untrained = work / "eval" / "untrained.json"
    if not untrained.is_file():
        _cli(
            [
                "eval",
                str(base_spec),
                "--model",
                str(assets / "target"),
                "--data",
                str(heldout),
                "--out",
                str(untrained),
            ],
            work / "logs" / "untrained.eval.log",
        )

    aligned_models = [
        {"name": "a_chatml", "path": str(work / "runs" / "aligned_a" / "final_model"), "max_tokens_per_batch": 1024},
        {"name": "b_zephyr", "path": str(work / "runs" / "aligned_b" / "final_model"), "max_tokens_per_batch": 1024},
    ]
    store = str(work / "score_store")

    def run_spec(seed: int, method: str, lr: float, port: int) -> tuple[str, Path]:
        name = f"{method}_seed{seed}_lr{lr:g}"
        fields: dict[str, Any] = {
            "seed": seed,
            "model": {"path": str(assets / "target")},
            "data": {"train_files": [str(data / "train.jsonl")]},
            "training": {"learning_rate": lr},
            "launcher": {"master_port": port},
        }
        if method == "poft":
            fields |= {
                "aligned_models": aligned_models,
                "objective": {"kind": "poft", "beta": 1.0, "gamma": 0.0},
                "score_store": {"dir": store},
                # Online only if a score is missing: 1 trainer + one reference rank per aligned model.
                "topology": {"procs_per_node": 3},
            }
        else:
            fields["objective"] = {"kind": "sft"}
        return name, _spec(work, name, **fields)

    # Score the training set once into the shared store: every PoFT run then trains alone.
    _, score_spec = run_spec(SEEDS[0], "poft", LEARNING_RATES[0], 29620)
    if not (work / "score_store.done").is_file():
        _cli(["score", str(score_spec)], work / "logs" / "score.log")
        (work / "score_store.done").write_text("ok\n")
    print(f"[noisy_sft] training set scored ({time.monotonic() - start:.0f} s)", flush=True)

    jobs = []
    for seed in SEEDS:
        for method in METHODS:
            for lr in LEARNING_RATES:
                jobs.append((seed, method, lr, *run_spec(seed, method, lr, 29630 + len(jobs))))

    def one(job: tuple) -> dict[str, Any]:
        seed, method, lr, name, spec = job
        report = _train_and_eval(work, name, spec, heldout, 0)
        out = {"seed": seed, "method": method, "lr": lr, "name": name, **_by_split(report, heldout_rows)}
        if method == "poft":
            out["weights"] = _poft_weights(work / "runs" / name, train_rows)
        print(
            f"[noisy_sft] {name}: valid EM {out['valid']['exact_match']:.3f}, test EM "
            f"{out['test']['exact_match']:.3f} ({time.monotonic() - start:.0f} s)",
            flush=True,
        )
        return out

    with ThreadPoolExecutor(PARALLEL) as pool:
        runs = list(pool.map(one, jobs))

    best: dict[str, dict[str, Any]] = {}
    for seed in SEEDS:
        for method in METHODS:
            mine = [r for r in runs if r["seed"] == seed and r["method"] == method]
            pick = max(mine, key=lambda r: (r["valid"]["exact_match"], r["valid"]["mean_logprob"]))
            best.setdefault(str(seed), {})[method] = pick
    results = {
        "train_rows": len(train_rows),
        "corrupted_rows": sum(r["corrupted"] for r in train_rows),
        "corruption_rate": sum(r["corrupted"] for r in train_rows) / len(train_rows),
        "valid_facts": sum(r["split"] == "valid" for r in heldout_rows),
        "test_facts": sum(r["split"] == "test" for r in heldout_rows),
        "steps": STEPS,
        "learning_rates": list(LEARNING_RATES),
        "selection": "best exact match on the valid facts, ties by mean log-prob",
        "aligned": {
            k: {"exact_match": v["exact_match"], "mean_logprob": v["mean_logprob"]} for k, v in aligned_reports.items()
        },
        "untrained_target": {k: json.loads(untrained.read_text())[k] for k in ("exact_match", "mean_logprob")},
        "best": best,
        "runs": runs,
        "wall_time_s": time.monotonic() - start,
    }
    atomic_write(work / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write(work / "results.md", _markdown(results).encode())
    print(_markdown(results))


if __name__ == "__main__":
    main()
