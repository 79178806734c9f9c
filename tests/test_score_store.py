"""The score store: each reference score computed once and reused; offline scoring; imported scores."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from poft_ds.data import chat
from poft_ds.data.schedule import Schedule
from poft_ds.score_store import ScoreStore, model_fingerprint, sample_key, scorer_id
from tests.conftest import base_spec, launch, launch_logs, read_metrics, start_cli, write_spec

pytestmark = pytest.mark.distributed


def scored_per_model(stdout: str) -> dict[str, int]:
    """'[poft-ds] ref/<name> rank r: N samples scored in ...' summed per model."""
    out: dict[str, int] = {}
    for name, n in re.findall(r"ref/(\w+) rank \d+: (\d+) samples scored", stdout):
        out[name] = out.get(name, 0) + int(n)
    return out


def _run(spec: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    proc = launch(write_spec(spec, tmp_path / name))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_second_epoch_and_reruns_do_no_reference_forward_passes(assets: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    spec = base_spec(
        assets,
        tmp_path / "run1",
        training={"learning_rate": 1e-3, "micro_batch_size": 2, "global_batch_size": 16, "epochs": 2},
        score_store={"dir": str(store)},
        checkpoint={"every_steps": 100, "save_final_model": False},
    )
    _run(spec, tmp_path, "run1.yaml")
    metrics = read_metrics(tmp_path / "run1")
    epoch0 = [m for m in metrics if m["epoch"] == 0]
    epoch1 = [m for m in metrics if m["epoch"] == 1]
    assert len(epoch0) == len(epoch1) == 6
    assert all(m["ref_forward_passes"] > 0 for m in epoch0)
    assert sum(m["ref_new_scores"] for m in epoch0) == 2 * 96  # two aligned models, every row once
    assert all(m["ref_forward_passes"] == 0 and m["ref_new_scores"] == 0 for m in epoch1)

    # A sweep: another beta and learning rate, same store -> no reference forward pass at all.
    spec2 = dict(spec, run_dir=str(tmp_path / "run2"), objective={"kind": "poft", "beta": 0.5})
    spec2["training"] = dict(spec["training"], learning_rate=5e-4)
    # The store holds every score of the schedule, so the launch starts no reference rank: the two
    # trainers alone train, reading the scores from the store (reference.mode: auto).
    proc = _run(spec2, tmp_path, "run2.yaml")
    rerun = read_metrics(tmp_path / "run2")
    assert all(m["ref_forward_passes"] == 0 for m in rerun)
    assert "no reference ranks start: the score store holds every fp32 score of the 96 scheduled samples" in proc.stdout
    assert scored_per_model(launch_logs(tmp_path / "run2")) == {}
    records = [json.loads(f.read_text()) for f in (tmp_path / "run2" / "ranks").glob("rank*.json")]
    assert sorted(r["role"] for r in records) == ["trainer", "trainer"]
    for a, b in zip(metrics, rerun):
        assert a["s_ref"] == pytest.approx(b["s_ref"], abs=1e-9)  # the same scores, from the store

    # Changing one model's max length invalidates exactly that model's entries.
    spec3 = dict(spec2, run_dir=str(tmp_path / "run3"))
    spec3["aligned_models"] = [dict(spec["aligned_models"][0]), dict(spec["aligned_models"][1], max_length=80)]
    # Asking for a store-only launch then names what the store lacks, before any rank starts.
    spec3["reference"] = {"mode": "store"}
    check = subprocess.run(
        [sys.executable, "-m", "poft_ds.cli", "validate", str(write_spec(spec3, tmp_path / "run3.yaml"))],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 2
    assert "reference.mode: store, but the score store has no fp32 score of zephyr" in check.stderr
    spec3["reference"] = {"mode": "auto"}  # reference ranks start for what is missing
    proc = _run(spec3, tmp_path, "run3.yaml")
    assert "reference ranks start: the score store has no fp32 score of zephyr" in proc.stdout
    assert scored_per_model(launch_logs(tmp_path / "run3")) == {"chatml": 0, "zephyr": 96}
    assert len([d for d in store.iterdir() if d.is_dir()]) == 3


def test_template_change_gives_a_new_scorer_and_corrupt_shards_are_ignored(assets: Path, tmp_path: Path) -> None:
    fp = model_fingerprint(str(assets / "aligned_zephyr"), tmp_path / "fp.json")
    assert fp == model_fingerprint(str(assets / "aligned_zephyr"), tmp_path / "fp.json")
    assert fp != model_fingerprint(str(assets / "aligned_chatml"))
    a = scorer_id(fp, "template A", 96, "right", "fp32")
    assert a != scorer_id(fp, "template B", 96, "right", "fp32")
    assert a != scorer_id(fp, "template A", 97, "right", "fp32")
    assert a == scorer_id(fp, "template A", 96, "right", "fp32")
    with pytest.MonkeyPatch.context() as mp:  # new masking rules: scores stored under the old ones are stale
        mp.setattr(chat, "MASK_RULES", chat.MASK_RULES + 1)
        assert a != scorer_id(fp, "template A", 96, "right", "fp32")

    store = ScoreStore(tmp_path / "s", a)
    k1, k2 = sample_key([{"role": "user", "content": "x"}]), sample_key([{"role": "user", "content": "y"}])
    store.write({k1: (-1.5, 3)})
    bad = store.write({k2: (-2.5, 4)})
    assert store.load() == {k1: (-1.5, 3), k2: (-2.5, 4)}
    bad.write_bytes(bad.read_bytes()[:-20])  # a torn write
    with pytest.warns(UserWarning, match="unverified shard"):
        assert store.load() == {k1: (-1.5, 3)}


def _score(spec_path: Path) -> subprocess.Popen[str]:
    return start_cli("score", str(spec_path))


def _store_scores(store: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for shard in store.glob("*/shard-*.parquet"):
        t = pq.read_table(shard)
        out.setdefault(shard.parent.name, {}).update(zip(t["key"].to_pylist(), t["score"].to_pylist()))
    return out


def _offline_spec(assets: Path, run_dir: Path, store: Path) -> dict:
    spec = base_spec(assets, run_dir, score_store={"dir": str(store), "flush_every_batches": 1})
    spec["aligned_models"] = [dict(m, score_batch_size=4) for m in spec["aligned_models"]]
    return spec


@pytest.fixture(scope="module")
def full_store(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A score store filled by one uninterrupted `poft-ds score` (every row, both aligned models)."""
    folder = tmp_path_factory.mktemp("full_store")
    full = _score(write_spec(_offline_spec(assets, folder / "run", folder / "store"), folder / "full.yaml"))
    assert full.wait(timeout=600) == 0, full.stdout.read()
    return folder / "store"


def test_offline_scoring_killed_halfway_resumes_without_rescoring(
    assets: Path, tmp_path: Path, full_store: Path
) -> None:
    def spec_for(store: Path) -> dict:
        return _offline_spec(assets, tmp_path / "run", store)

    # Reference: one uninterrupted run.
    expected = _store_scores(full_store)
    assert len(expected) == 2 and all(len(v) == 96 for v in expected.values())

    # Killed once some shards are on disk, then rerun.
    path = write_spec(spec_for(tmp_path / "resumed"), tmp_path / "resumed.yaml")
    proc = _score(path)
    deadline = time.time() + 300
    while len(list((tmp_path / "resumed").glob("*/shard-*.parquet"))) < 6:
        assert proc.poll() is None and time.time() < deadline, "scoring ended before it could be interrupted"
        time.sleep(0.05)
    # A crash: every process of the run dies at once (the launcher and its workers).
    subprocess.run(["pkill", "-KILL", "-f", str(path)], check=False)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while subprocess.run(["pgrep", "-f", str(path)], capture_output=True).returncode == 0:
        time.sleep(0.1)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("*/shard-*.parquet")}
    partial = _store_scores(tmp_path / "resumed")
    done = sum(len(v) for v in partial.values())
    assert 0 < done < 2 * 96

    rerun = _score(path)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out
    logs = launch_logs(tmp_path / "run")  # the reference ranks' summaries, of this launch only
    assert sum(int(n) for n in re.findall(r"(\d+) known from the score store", logs)) == done
    assert sum(scored_per_model(logs).values()) == 2 * 96 - done  # none of the finished work again
    for p, mtime in before.items():
        assert p.stat().st_mtime_ns == mtime  # finished shards untouched
    assert _store_scores(tmp_path / "resumed") == expected  # identical to the uninterrupted run


def test_precomputed_score_column_trains_without_reference_ranks(assets: Path, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in (assets / "data" / "train.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["mean_log_llm_probs"] = -1.0 - (i % 7) / 10  # as the authors' pipeline writes them
    (tmp_path / "scored.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = base_spec(
        assets,
        tmp_path / "run",
        aligned_models=[],
        data={"train_files": [str(tmp_path / "scored.jsonl")], "reference_score_column": "mean_log_llm_probs"},
        topology={"procs_per_node": 2},
        checkpoint={"every_steps": 100, "save_final_model": False},
    )
    proc = _run(spec, tmp_path, "job.yaml")
    assert "role=ref" not in proc.stdout
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 6
    lengths = tuple(sum(len(m["content"]) for m in r["messages"]) for r in rows)
    schedule = Schedule(
        tuple(range(96)), seed=7, global_batch=8, micro_batch=2, trainers=2, epochs=1, max_steps=6, lengths=lengths
    )
    for step, m in enumerate(metrics):
        batch = schedule.global_batch_at(step)
        assert m["s_ref"] == pytest.approx(sum(rows[i]["mean_log_llm_probs"] for i in batch) / 8, abs=1e-9)
        assert 0 < m["poft_weight"] < 1


def test_scores_show_export_and_filter(assets: Path, tmp_path: Path, full_store: Path) -> None:
    # A store `poft-ds score` filled (read only here: the filtered run below finds every score in it).
    spec = base_spec(assets, tmp_path / "run", score_store={"dir": str(full_store)})
    path = write_spec(spec, tmp_path / "job.yaml")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "poft_ds.cli", *args], capture_output=True, text=True, timeout=300)

    show = cli("scores", "show", str(path), "--png", str(tmp_path / "hist.png"), "--json", str(tmp_path / "r.json"))
    assert show.returncode == 0, show.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scored_by_every_model"] == 96
    assert (
        report["models"]["zephyr"]["scored"] == 96
        and report["models"]["zephyr"]["min"] < report["models"]["zephyr"]["max"]
    )
    assert -1 <= report["rank_correlation"]["chatml~zephyr"] <= 1
    assert len(report["lowest"]) == 10
    assert (tmp_path / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The aligned models were trained on clean rows only: noisy rows should be over-represented among the lowest.
    noisy = {
        json.loads(x)["id"]: json.loads(x)["noisy"] for x in (assets / "data" / "train.jsonl").read_text().splitlines()
    }
    lines = (assets / "data" / "train.jsonl").read_text().splitlines()
    lowest_noisy = sum(json.loads(lines[int(e["where"].rsplit(":", 1)[1]) - 1])["noisy"] for e in report["lowest"])
    assert lowest_noisy / 10 > sum(noisy.values()) / len(noisy)

    out = tmp_path / "scored.jsonl"
    exported = cli("scores", "export", str(path), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 96
    for r in records:
        assert r["mean_log_llm_probs"] == pytest.approx((r["score/chatml"] + r["score/zephyr"]) / 2)
    # A source weighted 2x repeats its rows in training; the exported data set holds each row once.
    weighted = dict(spec, data={"train_files": [{"path": spec["data"]["train_files"][0], "weight": 2.0}]})
    out2 = tmp_path / "weighted.jsonl"
    again = cli("scores", "export", str(write_spec(weighted, tmp_path / "weighted.yaml")), "--out", str(out2))
    assert again.returncode == 0, again.stderr
    assert [json.loads(x) for x in out2.read_text().splitlines()] == records
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left

    # Filtering by s_ref quantile, from the store: half the samples are kept, counts reported.
    filtered = dict(spec, run_dir=str(tmp_path / "filtered"))
    filtered["data"] = dict(spec["data"], filter_min_quantile=0.5)
    filtered["checkpoint"] = {"every_steps": 100, "save_final_model": False}
    proc = _run(filtered, tmp_path, "filtered.yaml")
    kept = json.loads((tmp_path / "filtered" / "data_report" / "filter_trainer.json").read_text())
    assert kept["kept"] + kept["dropped"] == 96 and 47 <= kept["kept"] <= 49  # the median splits ties upward
    assert f"score filter: kept {kept['kept']} of 96 samples" in proc.stdout
    s_ref = sorted(r["mean_log_llm_probs"] for r in records)
    assert kept["threshold"] == pytest.approx(s_ref[47])
    assert all(m["ref_forward_passes"] == 0 for m in read_metrics(tmp_path / "filtered"))
