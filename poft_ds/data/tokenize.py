"""Tokenize into the cache: every row under one model, with the results kept by content.

Samples live in Arrow columns (int32 token ids, a bit per token of response mask), not in
Python lists: a cached entry is a `datasets` folder that every rank of a node memory-maps, so the
token ids are in the page cache once per node and no rank holds its own copy. One process per
node and model tokenizes (the others wait on a file lock on the entry, then map it), in
`POFT_DS_TOKENIZE_PROCS` processes (default: the CPUs this process may use, at most 8) when there
are enough rows to pay for them.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poft_ds import __version__
from poft_ds.data.chat import MASK_RULES, ChatTokenizer, TokenizedSample
from poft_ds.data.rows import Row
from poft_ds.score_store import sample_key

# Below this many rows, worker processes cost more to start than they save.
PARALLEL_MIN_ROWS = 2000
PROCS_ENV = "POFT_DS_TOKENIZE_PROCS"
# Written last into an entry: what it must hold to be trusted (see `_open_entry`).
MANIFEST = "poft_manifest.json"
FORMAT = 1
COLUMNS = {
    "input_ids": pa.list_(pa.int32()),
    "response_mask": pa.list_(pa.bool_()),
    "lost_response_tokens": pa.int32(),
    "reason": pa.string(),
    "key": pa.string(),
}
# A fixed conversation whose `sample_key` an entry records: keys are stored with the tokens, so a
# change to how keys are computed must not reuse old ones.
KEY_PROBE = [{"role": "user", "content": "poft-ds key probe"}, {"role": "assistant", "content": "ok"}]


@dataclass
class TokenizeReport:
    """Counts of samples a tokenizer could not use, by reason, with example rows."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)


class TokenizedSamples(Sequence):
    """One model's samples of every row, read from Arrow columns (memory-mapped when cached).

    `samples[i]` builds the `TokenizedSample` of one row (None where the row is unusable), so only
    the samples in use are ever Python lists. Whole-column views (`lengths`, `keys`...) are
    computed by Arrow without building any sample.
    """

    def __init__(self, table: pa.Table):
        self.table = table
        # Every column is cut into the same record batches; a row is found by bisecting their starts.
        self._batches = table.to_batches()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches]).tolist()
        self._ids = table.schema.get_field_index("input_ids")
        self._mask = table.schema.get_field_index("response_mask")
        self._lost = table.schema.get_field_index("lost_response_tokens")

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, i: int) -> TokenizedSample | None: ...

    @overload
    def __getitem__(self, i: slice) -> list[TokenizedSample | None]: ...

    def __getitem__(self, i: int | slice) -> TokenizedSample | list[TokenizedSample | None] | None:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        b = bisect.bisect_right(self._starts, i) - 1
        return self._sample(self._batches[b], i - self._starts[b])

    def _sample(self, batch: pa.RecordBatch, j: int) -> TokenizedSample | None:
        ids = batch.column(self._ids)[j]
        if not ids.is_valid:
            return None
        return TokenizedSample(
            ids.values.to_numpy().tolist(),
            batch.column(self._mask)[j].values.to_numpy(zero_copy_only=False).tolist(),
            batch.column(self._lost)[j].as_py(),
        )

    def __iter__(self) -> Iterator[TokenizedSample | None]:
        for batch in self._batches:
            for j in range(batch.num_rows):
                yield self._sample(batch, j)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenizedSamples({len(self)} rows)"

    def lengths(self) -> np.ndarray:
        """Tokens of every sample (0 where unusable), int32."""
        return pc.list_value_length(self.table.column("input_ids")).fill_null(0).to_numpy().astype(np.int32)

    def lost_response_tokens(self) -> np.ndarray:
        """Response tokens every sample lost to max_length (0 where unusable), int32."""
        return self.table.column("lost_response_tokens").fill_null(0).to_numpy().astype(np.int32)

    def scored_tokens(self) -> np.ndarray:
        """Response tokens every sample is scored on (`sum(response_mask[1:])`, 0 where unusable), int64.

        Computed batch by batch from the mask bits, without building any sample.
        """
        out = []
        for batch in self._batches:
            masks = batch.column(self._mask)
            offsets = masks.offsets.to_numpy().astype(np.int64)
            bits = masks.values.to_numpy(zero_copy_only=False)
            running = np.concatenate([[0], np.cumsum(bits, dtype=np.int64)])
            # From each sample's second token to its end; an unusable sample has no tokens (0).
            start = np.minimum(offsets[:-1] + 1, offsets[1:])
            out.append(running[offsets[1:]] - running[start])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def reasons(self) -> dict[int, str]:
        """Why each unusable row is unusable, by row."""
        col = self.table.column("reason")
        bad = np.flatnonzero(col.is_valid().to_numpy(zero_copy_only=False))
        return {int(i): col[int(i)].as_py() for i in bad}

    @property
    def keys(self) -> StringColumn:
        """Content hash (`score_store.sample_key`) of every row; None where the row has no messages."""
        return StringColumn(self.table.column("key"))


class StringColumn(Sequence):
    """A read-only view of an Arrow string column: `col[i]` is a str or None."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str | None:  # type: ignore[override]
        return self.column[int(i)].as_py()

    def __iter__(self) -> Iterator[str | None]:
        for chunk in self.column.chunks:
            yield from chunk.to_pylist()


def default_procs() -> int:
    """Tokenizing processes: `POFT_DS_TOKENIZE_PROCS`, else the CPUs this process may use (at most 8)."""
    if os.environ.get(PROCS_ENV):
        return max(1, int(os.environ[PROCS_ENV]))
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def tokenize_rows(
    rows: list[Row], chat: ChatTokenizer, cache_dir: Path | None = None, procs: int | None = None
) -> tuple[TokenizedSamples, TokenizeReport]:
    """Tokenize every usable row; unusable ones become None and are counted by reason.

    With `cache_dir`, the result is kept under a hash of the rows' contents, the tokenizer's
    files, the template, max length and truncation, so a rerun does not tokenize again; the
    first process to need an entry builds it while the others wait, and all of them map it.

    Args:
        rows: The rows, usable or not.
        chat: The model's chat tokenizer.
        cache_dir: Where entries are kept; None tokenizes into memory.
        procs: Tokenizing processes; by default `default_procs()` from `PARALLEL_MIN_ROWS` rows, else one.
    """
    if procs is None:
        procs = default_procs() if len(rows) >= PARALLEL_MIN_ROWS else 1
    if cache_dir is None:
        table = _tokenize(rows, chat, procs, None).data.table
    else:
        table = _cached(Path(cache_dir), _cache_key(rows, chat), rows, chat, procs)
    samples = TokenizedSamples(table)
    report = TokenizeReport()
    for i, reason in samples.reasons().items():
        report.add(reason, rows[i].where)
    return samples, report


def _cache_key(rows: list[Row], chat: ChatTokenizer) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update((json.dumps(r.messages, ensure_ascii=False) if r.messages else f"!{r.problem}").encode())
        h.update(b"\0")
    folder = Path(chat.tok.name_or_path)
    for f in sorted(folder.glob("*")) if folder.is_dir() else []:
        if f.is_file() and (
            f.name.startswith(("tokenizer", "special_tokens", "added_tokens")) or f.suffix in (".model", ".jinja")
        ):
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    h.update(
        f"{chat.template}|{chat.max_length}|{chat.truncation}|{chat.prepend_bos}|{__version__}|{MASK_RULES}"
        f"|{chat.last_turn_only}".encode()
    )
    return h.hexdigest()[:32]


class _TokenizeBatch:
    """The `datasets.map` function: a batch of rows (JSON messages, problem) to sample columns."""

    def __init__(self, chat: ChatTokenizer):
        self.chat = chat

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for text, problem in zip(batch["messages"], batch["problem"]):
            messages = json.loads(text) if text is not None else None
            sample, reason = self.chat(messages) if problem is None else (None, problem)
            out["input_ids"].append(sample.input_ids if sample else None)
            out["response_mask"].append(sample.response_mask if sample else None)
            out["lost_response_tokens"].append(sample.lost_response_tokens if sample else None)
            out["reason"].append(reason)
            out["key"].append(sample_key(messages) if messages else None)
        return out


def _tokenize(rows: list[Row], chat: ChatTokenizer, procs: int, work: Path | None) -> Any:
    """Tokenize in `procs` processes; under `work`, rows and results go to Arrow files there.

    Returns:
        A `datasets.Dataset` of the sample columns, one row per input row, in order
        (memory-mapped from `work` when given, else in memory).
    """
    import datasets

    source = pa.table(
        {
            "messages": pa.array(
                (json.dumps(r.messages, ensure_ascii=False) if r.messages else None for r in rows),
                type=pa.string(),
                size=len(rows),
            ),
            "problem": pa.array([r.problem for r in rows], pa.string()),
        }
    )
    if work is not None:
        # Workers then map the rows from a file instead of receiving a pickled copy of them.
        with pa.OSFile(str(work / "rows.arrow"), "wb") as f, pa.ipc.new_stream(f, source.schema) as w:
            w.write_table(source, max_chunksize=1000)
        del source
        ds = datasets.Dataset.from_file(str(work / "rows.arrow"))
    else:
        ds = datasets.Dataset(datasets.table.InMemoryTable(source))
    with _quiet(len(rows)):
        return ds.map(
            _TokenizeBatch(chat),
            batched=True,
            batch_size=64,
            num_proc=procs if procs > 1 else None,
            remove_columns=["messages", "problem"],
            features=datasets.Features.from_arrow_schema(pa.schema(COLUMNS)),
            # The entry is keyed by content already; a fixed fingerprint spares hashing the tokenizer.
            new_fingerprint=f"poft-tokenize-{uuid.uuid4().hex}",
            load_from_cache_file=False,
            cache_file_name=str(work / "tokens.arrow") if work is not None else None,
            keep_in_memory=work is None,
            desc=f"poft-ds: tokenizing for {Path(chat.tok.name_or_path).name}",
        )


@contextlib.contextmanager
def _quiet(n_rows: int) -> Iterator[None]:
    """No `datasets` progress bars for small data sets (tests, `data inspect`): they are noise there."""
    import datasets

    if n_rows >= PARALLEL_MIN_ROWS or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _cached(cache_dir: Path, key: str, rows: list[Row], chat: ChatTokenizer, procs: int) -> pa.Table:
    """The entry `key`, opened memory-mapped; built first, by one process at a time, when missing or damaged."""
    from filelock import FileLock

    entry = cache_dir / key
    table = _open_entry(entry, len(rows))
    if table is not None:
        return table
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{key}.lock")):
        table = _open_entry(entry, len(rows))  # built by another process while this one waited
        if table is not None:
            return table
        for stale in cache_dir.glob(f"{key}.tmp-*"):  # left by a process that died building it
            shutil.rmtree(stale, ignore_errors=True)
        work = cache_dir / f"{key}.tmp-{os.getpid()}"
        work.mkdir()
        try:
            ds = _tokenize(rows, chat, procs, work)
            with _quiet(len(rows)):
                ds.save_to_disk(str(work / "entry"))
            del ds
            files = {f.name: f.stat().st_size for f in (work / "entry").iterdir()}
            manifest = {"format": FORMAT, "rows": len(rows), "key_probe": sample_key(KEY_PROBE), "files": files}
            (work / "entry" / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if entry.exists():  # damaged: replaced whole (ranks that mapped its files keep them)
                shutil.rmtree(entry)
            os.replace(work / "entry", entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    table = _open_entry(entry, len(rows))
    if table is None:
        raise RuntimeError(f"{entry}: the tokenized cache entry just written does not read back")
    return table


def _open_entry(entry: Path, n_rows: int) -> pa.Table | None:
    """An entry's table, memory-mapped, or None when it is missing or cannot be trusted.

    Trusted when its manifest (written last) names every file at its size, the key computation
    is the current one, and the Arrow data holds `n_rows` rows of the expected columns with
    consistent offsets. A bit flipped inside token data would pass: that takes a checksum of
    every byte, on every rank, every launch.
    """
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if (
            manifest.get("format") != FORMAT
            or manifest.get("rows") != n_rows
            or manifest.get("key_probe") != sample_key(KEY_PROBE)
        ):
            return None
        for name, size in manifest["files"].items():
            if (entry / name).stat().st_size != size:
                return None
        table = _map_saved_dataset(entry)
        if table.num_rows != n_rows or table.schema != pa.schema(COLUMNS):
            return None
        table.validate(full=False)
        return table
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


def _map_saved_dataset(folder: Path) -> pa.Table:
    """The table of a folder `datasets.Dataset.save_to_disk` wrote, memory-mapped as `load_from_disk`
    maps it (its Arrow stream files, in order), without importing `datasets` (and pandas) in every rank
    that only reads the cache.

    Raises:
        ValueError: a folder with an indices mapping (never written here) or no data file.
    """
    state = json.loads((folder / "state.json").read_text())
    if state.get("_indices_data_files") or not state.get("_data_files"):
        raise ValueError(f"{folder}: not a plain saved dataset")
    tables = [pa.ipc.open_stream(pa.memory_map(str(folder / f["filename"]))).read_all() for f in state["_data_files"]]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
