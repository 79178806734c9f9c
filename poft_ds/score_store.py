"""The score store: every reference score computed once, kept on disk, reused by every later run.

A reference score depends only on the sample and on the *scorer*: the aligned model's files, its
chat template, max length, truncation and precision. The store keeps one folder per scorer,

    <store>/<scorer id>/scorer.json                what the id stands for (for people)
    <store>/<scorer id>/shard-<writer>.parquet     sample key -> (score, response tokens)
    <store>/<scorer id>/shard-<writer>.parquet.sha256

so changing a model's template or max length invalidates exactly that model's entries. Every
writer writes its own shards (written aside, then renamed, its checksum file first), so any number
of ranks and jobs can write at once without locks; a shard whose checksum file is missing or
wrong is ignored with a warning, and its scores are simply computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from poft_ds.files import atomic_write

SCHEMA = pa.schema([("key", pa.string()), ("score", pa.float64()), ("n_tokens", pa.int32())])


def sample_key(messages: list[dict[str, str]]) -> str:
    """Content hash of a conversation (roles and texts, nothing else)."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model_dir: str, cache_file: Path | None = None) -> str:
    """Hash of every file of a model directory (config, weights, tokenizer).

    Weight files are large, so each file's hash is cached by (path, size, mtime) in `cache_file`.
    """
    cache: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    h = hashlib.sha256()
    changed = False
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        tag = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if tag not in cache:
            cache[tag] = _file_sha256(f)
            changed = True
        h.update(f"{f.relative_to(model_dir)}={cache[tag]};".encode())
    if changed and cache_file is not None:
        atomic_write(cache_file, json.dumps(cache).encode())
    return h.hexdigest()


def scorer_id(
    fingerprint: str, template: str, max_length: int, truncation: str, precision: str, last_turn_only: bool = False
) -> str:
    """Identity of everything besides the sample that a score depends on.

    The masking rules' version is part of it: a change to which tokens count as the response
    changes every score, so scores stored under earlier rules are not reused. So is whether only
    the last assistant turn is scored (DPO) or every one (PoFT).
    """
    from poft_ds.data import chat  # imported here: it pulls in transformers, which the store needs nowhere else

    parts = [fingerprint, hashlib.sha256(template.encode()).hexdigest(), str(max_length), truncation, precision]
    parts.append(f"mask-rules-{chat.MASK_RULES}")
    if last_turn_only:
        parts.append("last-turn-only")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


class ScoreStore:
    """The scores of one scorer.

    Args:
        root: The store directory (shared by all models and runs).
        scorer: The scorer id (`scorer_id`).
        description: What the scorer is, written to scorer.json.
    """

    def __init__(self, root: str | Path, scorer: str, description: dict | None = None) -> None:
        self.dir = Path(root) / scorer
        self.dir.mkdir(parents=True, exist_ok=True)
        if description is not None and not (self.dir / "scorer.json").exists():
            atomic_write(self.dir / "scorer.json", json.dumps(description, indent=2).encode())

    def load(self) -> dict[str, tuple[float, int]]:
        """Every verified score: key -> (score, response tokens)."""
        out: dict[str, tuple[float, int]] = {}
        for shard in sorted(self.dir.glob("shard-*.parquet")):
            check = shard.with_name(shard.name + ".sha256")
            if not check.is_file() or check.read_text().strip() != _file_sha256(shard):
                warnings.warn(f"score store: ignoring unverified shard {shard}", stacklevel=2)
                continue
            table = pq.read_table(shard)
            for k, s, n in zip(table["key"].to_pylist(), table["score"].to_pylist(), table["n_tokens"].to_pylist()):
                out[k] = (s, n)
        return out

    def write(self, scores: dict[str, tuple[float, int]]) -> Path | None:
        """Add scores as a new shard (atomic: a reader sees all of it or none)."""
        if not scores:
            return None
        keys = list(scores)
        table = pa.table(
            {
                "key": keys,
                "score": [scores[k][0] for k in keys],
                "n_tokens": [scores[k][1] for k in keys],
            },
            schema=SCHEMA,
        )
        name = f"shard-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        # Checksum first: a shard that is visible under its final name always has its checksum.
        atomic_write(self.dir / (name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
        atomic_write(self.dir / name, data)
        return self.dir / name
