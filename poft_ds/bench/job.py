"""`poft-ds bench job.yaml`: does PoFT cost anything over SFT? The user's own job, run three ways.

1. `sft`: the same spec with `objective.kind: sft` and no aligned models (the trainer ranks only);
2. `poft_online`: PoFT as written, reference ranks scoring while the trainers train, into a fresh,
   empty score store;
3. `poft_store`: PoFT again on the store run 2 filled (`reference.mode: store`): no reference
   rank starts, the trainers read every score from the store (`ref_forward_passes` is 0).

Each run is a real `poft-ds launch` of a variant spec written into the bench folder (the folder of
`--out`, default `<run_dir>/bench`): `<name>.yaml`, its run directory `<name>/` and the launch's
output `<name>.log`. Only what the variants need is changed: the objective and aligned models,
the process count (SFT runs the trainer ranks alone), run and store directories, a fresh
rendezvous port, per-step logging, no final model export and a checkpoint only at the end (the
trainers always write one there). Figures come from each run's `metrics.jsonl` and
`ranks/summary_rank<N>.json`; a figure a run does not write is reported as missing (None, "-"),
never guessed. Throughput skips the first `--warmup-steps` steps (start-up, allocator warm-up).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from poft_ds.launchers import free_port
from poft_ds.spec import JobSpec, load_spec

RUNS = ("sft", "poft_online", "poft_store")

# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s, matched in order as
# substrings of torch.cuda.get_device_name() (so "H100 PCIe" before "H100"). `--peak-tflops`
# overrides the table, and is needed for any GPU not in it.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("MI300X", 1307.0),
)


class BenchError(RuntimeError):
    """A benchmark that cannot run, or a run of it that failed (the message names its log)."""


def bench_job(
    spec_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    warmup_steps: int = 2,
    peak_tflops: float | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Run a job spec as SFT, PoFT with online scoring and PoFT from the score store; compare them.

    Args:
        spec_path: The user's PoFT job spec (YAML).
        out: Where the JSON result goes; its folder holds the runs. Default `<run_dir>/bench/bench.json`.
        steps: Optimizer steps of each run (overrides `training.max_steps`); default the spec's.
        warmup_steps: Leading steps left out of the throughput figures.
        peak_tflops: Peak FLOP/s of one accelerator, in TFLOP/s, for MFU; default the known GPU's
            dense bf16 peak (`PEAK_BF16_TFLOPS`). MFU is None on CPU.
        repeats: Rounds of the three runs, one after the other (sft, online, store, sft, ...), in
            `repeat<N>/` subfolders: each variant reports its median round, and the ratios are the
            medians of the rounds' ratios (a round's runs are close in time, so they share the
            machine's state; noisy machines need several).

    Returns:
        The result written to `out`: each run's figures under `runs`, the comparison under `compare`.

    Raises:
        BenchError: a spec the benchmark cannot vary, or a run that failed.
        SpecError: an invalid spec.
    """
    spec = load_spec(spec_path)
    _check_benchable(spec, steps, warmup_steps)
    out = Path(out) if out else Path(spec.run_dir) / "bench" / "bench.json"
    folder = out.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    if repeats < 1:
        raise BenchError(f"--repeats {repeats}: at least one round")
    # Every variant's ranks get the CPU threads the PoFT layout gives them. torchrun sets
    # OMP_NUM_THREADS=1 only when it starts several processes per node, so the SFT run (trainers
    # alone) would otherwise take every core for one trainer: an unfair comparison, and on a busy
    # machine a slow one (two spinning OpenMP threads and any other process fighting for the cores
    # made steps up to 20x slower in a measurement on 2 cores).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // spec.launched_procs_per_node))
    rounds = []
    for r in range(repeats):
        where = folder if repeats == 1 else folder / f"repeat{r + 1}"
        where.mkdir(parents=True, exist_ok=True)
        variants = _variants(spec, where, steps)
        rounds.append({name: _run(name, variants[name], where, warmup_steps, threads) for name in RUNS})
    runs = {name: _median_round([r[name] for r in rounds]) for name in RUNS}
    params = _count_parameters(Path(spec.model.path))
    peak = _peak_flops(runs["sft"]["device"], peak_tflops)
    for run in runs.values():
        run["mfu"] = _mfu(params, run["trainer_tokens_per_s"], run["trainer_ranks"], peak)
    result = {
        "spec": str(Path(spec_path).resolve()),
        "folder": str(folder),
        "steps": runs["sft"]["steps"],
        "warmup_steps": warmup_steps,
        "target_parameters": params,
        "peak_flops_per_device": peak,
        "runs": runs,
        "repeats": repeats,
        "omp_num_threads": int(threads),
        "compare": _compare(runs, spec),
    }
    if repeats > 1:
        per_round = [_compare(r, spec) for r in rounds]
        for key in ("poft_online_over_sft", "poft_store_over_sft"):
            values = [c[key] for c in per_round if c[key] is not None]
            result["compare"][key] = statistics.median(values) if values else None
            result["compare"][f"{key}_per_round"] = [c[key] for c in per_round]
        best = {name: best_of_rounds([r[name] for r in rounds]) for name in RUNS}
        result["compare"]["best_of_rounds"] = {
            "how": "tokens/s from each step's fastest time over the rounds (every run of a variant trains the same "
            "steps on the same samples, and a busy machine only ever adds time); ratios to SFT's",
            "trainer_tokens_per_s": best,
            "poft_online_over_sft": _ratio(best["poft_online"], best["sft"]),
            "poft_store_over_sft": _ratio(best["poft_store"], best["sft"]),
        }
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _check_benchable(spec: JobSpec, steps: int | None, warmup_steps: int) -> None:
    """Refuse, naming the field, a spec whose three variants would not measure what they claim."""
    if spec.objective.kind != "poft" or not spec.aligned_models:
        raise BenchError(
            "objective.kind: the benchmark compares PoFT with reference ranks against SFT; give a PoFT spec "
            "with aligned_models"
        )
    if spec.data.filter_min_score is not None or spec.data.filter_min_quantile is not None:
        raise BenchError(
            "data.filter_min_score / filter_min_quantile: the online run starts from an empty score store, "
            "which a score filter cannot read; remove the filter to benchmark"
        )
    if spec.trainer_ranks % spec.topology.nodes:
        raise BenchError(
            f"topology: {spec.trainer_ranks} trainer ranks do not spread evenly over {spec.topology.nodes} nodes, "
            "so the SFT run (trainer ranks only) has no procs_per_node"
        )
    total = steps if steps is not None else spec.training.max_steps
    if warmup_steps < 0 or (total is not None and total <= warmup_steps):
        raise BenchError(f"--warmup-steps {warmup_steps} leaves no measured step of {total}")


def _variants(spec: JobSpec, folder: Path, steps: int | None) -> dict[str, dict[str, Any]]:
    """The three runs' specs as plain data (absolute paths, so they load from the bench folder)."""
    base = spec.public_dump()
    if steps is not None:
        base["training"]["max_steps"] = steps
    base["logging"]["every_steps"] = 1  # per-step figures; warm-up steps are skipped by number
    base["checkpoint"] |= {"save_final_model": False, "every_steps": 10**9, "resume": "never"}
    base["score_store"]["enabled"] = True
    store = str(folder / "poft_online" / "score_store")
    out = {}
    for name in RUNS:
        v = json.loads(json.dumps(base))  # a deep copy
        v["run_dir"] = str(folder / name)
        v["launcher"]["master_port"] = free_port()
        if name == "sft":
            v["objective"]["kind"] = "sft"
            v["aligned_models"] = []
            v["topology"]["procs_per_node"] = spec.trainer_ranks // spec.topology.nodes
        else:
            v["score_store"]["dir"] = store  # online fills it (fresh: its folder is removed first)
            # The store run starts no reference rank: its trainers read every score from the store.
            v["reference"]["mode"] = "online" if name == "poft_online" else "store"
        out[name] = v
    return out


def _run(name: str, variant: dict[str, Any], folder: Path, warmup_steps: int, threads: str) -> dict[str, Any]:
    """Launch one variant through the CLI and collect its figures."""
    run_dir = Path(variant["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (and, for poft_online, a fresh store)
    spec_file = folder / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(variant, sort_keys=False))
    log = folder / f"{name}.log"
    print(f"[poft-ds bench] {name}: poft-ds launch {spec_file} (output: {log})", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "poft_ds.cli", "launch", str(spec_file)], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise BenchError(f"{name}: poft-ds launch exited with {proc.returncode}; last lines of {log}:\n{tail}")
    run = collect_run(run_dir, warmup_steps)
    run |= {"spec": str(spec_file), "log": str(log), "launch_wall_s": wall}
    print(f"[poft-ds bench] {name}: done in {wall:.1f}s", flush=True)
    return run


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median trainer tokens/s, with every round's figure alongside."""
    rates = [r["trainer_tokens_per_s"] or 0.0 for r in runs]
    median = sorted(range(len(runs)), key=lambda i: rates[i])[(len(runs) - 1) // 2]
    return runs[median] | {"trainer_tokens_per_s_rounds": [r["trainer_tokens_per_s"] for r in runs]}


def best_of_rounds(runs: list[dict[str, Any]]) -> float | None:
    """Trainer tokens/s of one variant from each measured step's fastest time over its rounds.

    Every round of a variant runs the same schedule (same seed, data and batching), so step k
    trains the same samples each time; on a shared machine, contention only ever adds time, so
    the fastest of R runs of a step estimates its cost, and the ratio of two variants' sums is far
    steadier than the ratio of their round medians (timeit takes the minimum for the same reason).
    None when the rounds did not log the same steps with the same token counts.
    """
    times = [r.get("measured_step_s") or [] for r in runs]
    tokens = [r.get("measured_step_tokens") or [] for r in runs]
    if not times[0] or any(len(t) != len(times[0]) for t in times) or any(t != tokens[0] for t in tokens):
        return None
    fastest = [min(column) for column in zip(*times)]
    return sum(tokens[0]) / sum(fastest)


def _tokens_per_s(steps: list[dict[str, Any]]) -> float | None:
    """All the steps' real tokens over all their seconds (slow steps weigh as much as they cost)."""
    tokens, seconds = _field(steps, "tokens"), _field(steps, "step_time_s")
    if steps and len(tokens) == len(seconds) == len(steps):
        return sum(tokens) / sum(seconds) if sum(seconds) else None
    return _mean(_field(steps, "tokens_per_s"))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _field(records: list[dict[str, Any]], key: str) -> list[float]:
    """The finite values a field has in the records that report it."""
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def collect_run(run_dir: Path, warmup_steps: int) -> dict[str, Any]:
    """One finished run's figures, from `metrics.jsonl`, `ranks/rank<N>.json` and `ranks/summary_rank<N>.json`.

    Trainer tokens/s is the measured steps' tokens over their seconds (`tokens`, `step_time_s`),
    after `warmup_steps`; runs that do not log those fall back to the mean of `tokens_per_s`.
    """
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = [r for r in metrics if r["step"] > warmup_steps]
    ranks = {}
    for f in sorted((run_dir / "ranks").glob("rank*.json")):
        rec = json.loads(f.read_text())
        ranks[rec["global_rank"]] = {"role": rec["role"], "device": rec["device"]}
    for f in (run_dir / "ranks").glob("summary_rank*.json"):
        rank = int(f.stem.removeprefix("summary_rank"))
        ranks.setdefault(rank, {}).update(json.loads(f.read_text()))
    ranks = dict(sorted(ranks.items()))
    by_role: dict[str, list[dict[str, Any]]] = {}
    for rec in ranks.values():
        by_role.setdefault(rec.get("role", "?"), []).append(rec)
    trainers = by_role.get("trainer", [])
    waits = _field(measured, "wait_for_scores_s")
    first = next(iter(metrics), {})
    run: dict[str, Any] = {
        "steps": len(metrics),
        "measured_steps": len(measured),
        "device": ranks.get(0, {}).get("device"),
        "trainer_ranks": len(trainers),
        "reference_ranks": sum(len(v) for k, v in by_role.items() if k.startswith("ref/")),
        "trainer_tokens_per_s": _tokens_per_s(measured),
        # Per measured step, for the best-of-rounds figure (the same steps in every run of a spec).
        "measured_step_s": _field(measured, "step_time_s"),
        "measured_step_tokens": _field(measured, "tokens"),
        "wait_for_scores_s": {"sum": sum(waits) if waits else None, "per_step": _mean(waits)},
        "ref_forward_passes": int(sum(_field(metrics, "ref_forward_passes")))
        if _field(metrics, "ref_forward_passes")
        else None,
        "ref_new_scores": int(sum(_field(metrics, "ref_new_scores"))) if _field(metrics, "ref_new_scores") else None,
        "time_to_first_step_s": first.get("time_to_first_step_s", _role_max(trainers, "time_to_first_step_s")),
        "peak_memory_bytes_rank0": max(_field(metrics, "peak_memory_bytes"), default=None),
        "training_padding_efficiency": _efficiency(trainers) or _mean(_field(measured, "padding_efficiency")),
        "trainer_busy_s_per_step": _per_step(trainers, len(metrics)),
        "reference": {
            role.removeprefix("ref/"): {
                "ranks": len(recs),
                # Scoring throughput while busy (a group's ranks run their forward passes together);
                # None when the run scored nothing (every score came from the store).
                "tokens_per_s": _ratio(_sum(recs, "tokens") or None, _mean(_field(recs, "busy_s"))),
                "padding_efficiency": _efficiency(recs),
                "busy_s_per_step": _per_step(recs, len(metrics)),
            }
            for role, recs in by_role.items()
            if role.startswith("ref/")
        },
        "peak_memory": {
            str(rank): {
                "role": rec.get("role"),
                "peak_rss_bytes": rec.get("peak_rss_bytes"),
                "peak_device_bytes": rec.get("peak_device_bytes"),
            }
            for rank, rec in ranks.items()
        },
    }
    return run


def _total(records: list[dict[str, Any]], key: str) -> int | None:
    """A count summed over every step (None when no step reports it, as in SFT)."""
    values = _field(records, key)
    return int(sum(values)) if values else None


def _sum(recs: list[dict[str, Any]], key: str) -> float | None:
    values = _field(recs, key)
    return sum(values) if len(values) == len(recs) and values else None


def _efficiency(recs: list[dict[str, Any]]) -> float | None:
    """Real / processed tokens over the ranks' summaries (None unless every rank reports both)."""
    return _ratio(_sum(recs, "tokens"), _sum(recs, "processed_tokens"))


def _per_step(recs: list[dict[str, Any]], steps: int) -> float | None:
    busy = _field(recs, "busy_s")
    return sum(busy) / len(busy) / steps if busy and len(busy) == len(recs) and steps else None


def _role_max(recs: list[dict[str, Any]], key: str) -> float | None:
    return max(_field(recs, key), default=None)


def _count_parameters(model_dir: Path) -> int | None:
    """The target's parameter count, from its safetensors headers (no weights are read)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def _peak_flops(device: str | None, peak_tflops: float | None) -> float | None:
    """One accelerator's peak FLOP/s: `--peak-tflops`, else the table's; None on CPU or an unknown GPU."""
    if not device or not device.startswith("cuda"):
        return None
    if peak_tflops:
        return peak_tflops * 1e12
    import torch  # here, after the runs: CUDA is initialised in this process only once they are done

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    print(f"[poft-ds bench] no peak FLOP/s known for {name!r}; pass --peak-tflops for MFU", flush=True)
    return None


def _mfu(params: int | None, tokens_per_s: float | None, devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of the trainer devices: 6 x parameters x real tokens/s over their peak.

    6N FLOPs per token (forward 2N, backward 4N) leaves out attention's own FLOPs and padding, so
    this is the usual conservative figure; reference devices are not counted.
    """
    if params is None or tokens_per_s is None or peak is None or not devices:
        return None
    return 6 * params * tokens_per_s / (devices * peak)


def _compare(runs: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """Ratios to SFT, and the reference ranks per aligned model that would keep trainers from waiting."""
    sft = runs["sft"]["trainer_tokens_per_s"]
    online = runs["poft_online"]
    trainer_step = online["trainer_busy_s_per_step"]
    needed = {}
    for m in spec.aligned_models:
        ref = online["reference"].get(m.name, {})
        busy = ref.get("busy_s_per_step")
        estimate = math.ceil(m.ranks * busy / trainer_step) if busy is not None and trainer_step else None
        needed[m.name] = {
            "ranks": m.ranks,
            "estimate": max(estimate, 1) if estimate is not None else None,
            "busy_s_per_step": busy,
        }
    return {
        "poft_online_over_sft": _ratio(online["trainer_tokens_per_s"], sft),
        "poft_store_over_sft": _ratio(runs["poft_store"]["trainer_tokens_per_s"], sft),
        "reference_ranks_needed": {
            "estimate": True,
            "how": "from the online run: ceil(ranks x reference busy s per step / trainer busy s per step), "
            "assuming reference work shards evenly over more ranks; measure to confirm",
            "trainer_busy_s_per_step": trainer_step,
            "models": needed,
        },
    }


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{value / 2**20:.0f} MiB"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "pct":
        return f"{100 * value:.3g}%"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table: one column per run, "-" where a run reports no figure."""
    runs = result["runs"]
    sft = runs["sft"]["trainer_tokens_per_s"]
    rows: list[tuple[str, list[str]]] = [
        ("trainer ranks", [_fmt(r["trainer_ranks"]) for r in runs.values()]),
        ("reference ranks", [_fmt(r["reference_ranks"]) for r in runs.values()]),
        ("trainer tokens/s", [_fmt(r["trainer_tokens_per_s"]) for r in runs.values()]),
        ("  / SFT", [_fmt(_ratio(r["trainer_tokens_per_s"], sft), "ratio") for r in runs.values()]),
        ("MFU (trainer devices)", [_fmt(r["mfu"], "pct") for r in runs.values()]),
        ("waited on scores, s", [_fmt(r["wait_for_scores_s"]["sum"]) for r in runs.values()]),
        ("  per step, s", [_fmt(r["wait_for_scores_s"]["per_step"]) for r in runs.values()]),
        ("ref forward passes", [_fmt(r["ref_forward_passes"]) for r in runs.values()]),
        ("padding eff. (training)", [_fmt(r["training_padding_efficiency"], "pct") for r in runs.values()]),
    ]
    models = sorted({m for r in runs.values() for m in r["reference"]})
    for m in models:
        refs = [r["reference"].get(m, {}) for r in runs.values()]
        rows.append((f"ref/{m} tokens/s", [_fmt(x.get("tokens_per_s")) for x in refs]))
        rows.append((f"ref/{m} padding eff.", [_fmt(x.get("padding_efficiency"), "pct") for x in refs]))
    rows.append(("peak memory rank 0", [_fmt(r["peak_memory_bytes_rank0"], "bytes") for r in runs.values()]))
    for role in ["trainer", *(f"ref/{m}" for m in models)]:
        cells = []
        for r in runs.values():
            peaks = [
                p["peak_device_bytes"] if p.get("peak_device_bytes") is not None else p.get("peak_rss_bytes")
                for p in r["peak_memory"].values()
                if p.get("role") == role
            ]
            peaks = [p for p in peaks if p is not None]
            cells.append(_fmt(max(peaks), "bytes") if peaks else "-")
        rows.append((f"peak memory {role} (max)", cells))
    rows.append(("time to first step, s", [_fmt(r["time_to_first_step_s"]) for r in runs.values()]))
    rows.append(("launch wall time, s", [_fmt(r["launch_wall_s"]) for r in runs.values()]))
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(c[i]) for _, c in rows)) for i, n in enumerate(runs)]
    lines = [
        f"poft-ds bench: {result['steps']} steps per run, the first {result['warmup_steps']} not measured; "
        f"{result.get('omp_num_threads', '?')} CPU thread(s) per rank (OMP_NUM_THREADS); runs in {result['folder']}",
        " " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(runs, cols)),
    ]
    lines += [label.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, cols)) for label, cells in rows]
    cmp = result["compare"]
    rounds = f" (medians of {result['repeats']} rounds' ratios)" if result.get("repeats", 1) > 1 else ""
    lines.append(
        f"PoFT-online / SFT tokens/s: {_fmt(cmp['poft_online_over_sft'], 'ratio')}; "
        f"PoFT-store / SFT: {_fmt(cmp['poft_store_over_sft'], 'ratio')}{rounds}"
    )
    best = cmp.get("best_of_rounds")
    if best:
        lines.append(
            f"best of rounds (each step's fastest time): PoFT-online / SFT {_fmt(best['poft_online_over_sft'], 'ratio')}; "
            f"PoFT-store / SFT {_fmt(best['poft_store_over_sft'], 'ratio')}"
        )
    need = cmp["reference_ranks_needed"]
    parts = [f"{name} {_fmt(v['estimate'])} (now {v['ranks']})" for name, v in need["models"].items()]
    lines.append(
        "reference ranks per aligned model that keep the trainers from waiting, an ESTIMATE from the online "
        "run (ceil(ranks x reference busy s / trainer busy s per step)): " + ", ".join(parts)
    )
    lines.append('("-": the runs did not report that figure)')
    return "\n".join(lines)
