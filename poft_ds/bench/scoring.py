"""`poft-ds bench scoring`: poft-ds's scorer against pad-to-max-length full float32 logits.

Both methods score the same synthetic samples with the same randomly initialised Llama-shaped
model (sdpa attention) and must give the same per-sample mean response log-probabilities:

* `pad_to_max_length` (the authors' scorer): batches of `baseline_batch_size` samples, each padded
  to `max_length`, the model's full forward, float32 logits of the whole [batch, seq, vocabulary],
  log_softmax, gather the targets, mean over response tokens;
* `poft_ds`: `ResponseScorer` on padding-free packed rows (`pack`) of at most `max_tokens` tokens
  (`pack_positions`), applying the output head only at response positions, `chunk_tokens` at a
  time, so float32 logits never exceed chunk x vocabulary.

Sample lengths are log-normal like chat SFT data (as `poft-ds bench padding` draws them); the
response is the last `response_fraction` of each sample. Each method runs in a fresh subprocess so
that its peak memory is its own: `ru_maxrss` after the run minus after the model is built (CPU), or
`torch.cuda.max_memory_allocated` minus what the model holds (GPU). Throughput counts real (sample)
tokens per second for both methods, so the ratio is the speed-up on the same work.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

METHODS = ("pad_to_max_length", "poft_ds")

# The setting (`--full`): the paper's length distribution and a Llama-3.2-1B-shaped model,
# sized for one GPU.
FULL = {
    "n_samples": 512,
    "median_tokens": 800,
    "max_length": 4096,
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "layers": 16,
    "heads": 32,
    "kv_heads": 8,
    "max_tokens": 8192,
    "baseline_batch_size": 8,
}


def draw_samples(
    n_samples: int,
    median_tokens: int,
    sigma: float,
    max_length: int,
    vocab_size: int,
    response_fraction: float,
    seed: int,
) -> list:
    """Synthetic `TokenizedSample`s: log-normal lengths, random token ids, a trailing response."""
    from poft_ds.data.chat import TokenizedSample

    g = torch.Generator().manual_seed(seed)
    # The same draw as `poft_ds.bench.padding`, so both benchmarks see one distribution.
    draws = torch.empty(n_samples, dtype=torch.float64).log_normal_(math.log(median_tokens), sigma, generator=g)
    lengths = draws.clamp(16, max_length).round().long().tolist()
    samples = []
    for n in lengths:
        ids = torch.randint(vocab_size, (n,), generator=g).tolist()
        response = max(1, round(response_fraction * n))
        samples.append(TokenizedSample(ids, [False] * (n - response) + [True] * response))
    return samples


def _build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config["seed"])
    cfg = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"],
        num_key_value_heads=config["kv_heads"],
        max_position_embeddings=max(config["max_length"], config["max_tokens"]),
        tie_word_embeddings=False,
    )
    # Built on the device directly: a GPU-sized model initialises far faster there.
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def _pad_to(batch, width: int, pad_id: int):
    """Widen a right-padded batch to `width` columns (the baseline pads every row to max_length)."""
    from poft_ds.data.batch import Batch

    extra = width - batch.input_ids.shape[1]
    return Batch(
        F.pad(batch.input_ids, (0, extra), value=pad_id),
        F.pad(batch.response_mask, (0, extra), value=False),
        F.pad(batch.sample_index, (0, extra), value=0),
        batch.n_samples,
        attention_mask=F.pad(batch.attention_mask, (0, extra), value=0),
    )


def full_logits_scores(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' scorer: full forward, float32 log_softmax of every position, gather, mask."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask[:, 1:]
    return (logp * mask).sum(1), mask.sum(1)


def _run_method(config: dict[str, Any], method: str) -> dict[str, Any]:
    """Score every sample with one method; meant for a fresh process (its peak memory is measured)."""
    from poft_ds.data.batch import collate, pack
    from poft_ds.data.schedule import pack_positions
    from poft_ds.scoring import ResponseScorer

    device = torch.device(config["device"])
    dtype = getattr(torch, config["dtype"])
    samples = draw_samples(
        config["n_samples"],
        config["median_tokens"],
        config["sigma"],
        config["max_length"],
        config["vocab_size"],
        config["response_fraction"],
        config["seed"],
    )
    lengths = [len(s.input_ids) for s in samples]
    if method == "pad_to_max_length":
        size = config["baseline_batch_size"]
        groups = [list(range(k, min(k + size, len(samples)))) for k in range(0, len(samples), size)]
        batches = [_pad_to(collate([samples[i] for i in g], 0), config["max_length"], 0) for g in groups]
        head_positions = sum(b.input_ids.numel() for b in batches)
        logits_rows = max(b.input_ids.numel() for b in batches)
    else:
        (groups,) = pack_positions(lengths, config["max_tokens"], 1)
        batches = [pack([samples[i] for i in g]) for g in groups]
        head_positions = sum(int(b.response_mask[:, 1:].sum()) for b in batches)
        logits_rows = min(config["chunk_tokens"], max(int(b.response_mask[:, 1:].sum()) for b in batches))

    model = _build_model(config, device, dtype)
    scorer = ResponseScorer(model, config["chunk_tokens"])

    def score(batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(device)
        if method == "pad_to_max_length":
            return full_logits_scores(model, batch)
        return scorer(*batch.inputs())

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores = [0.0] * len(samples)
    with torch.inference_mode():
        score(batches[0])  # warm-up (kernel selection, allocator), not timed
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = [score(b) for b in batches]
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    for g, (logp_sum, n_tokens) in zip(groups, results):
        for i, mean in zip(g, (logp_sum.float() / n_tokens).tolist()):
            scores[i] = mean
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "batches": len(batches),
        "real_tokens": sum(lengths),
        "processed_tokens": sum(b.processed_tokens for b in batches),
        # Positions the output head runs at (the float32 logits' rows): all of them, or the responses.
        "head_positions": head_positions,
        "real_tokens_per_s": sum(lengths) / seconds,
        # The float32 logits alone at their largest, by construction: [batch, max_length, vocab] for
        # the baseline, one chunk of response positions x vocab for poft-ds.
        "float32_logits_peak_bytes": logits_rows * config["vocab_size"] * 4,
        "peak_scoring_bytes": torch.cuda.max_memory_allocated() - held if cuda else (rss_peak - rss_built) * 1024,
        "peak_memory_measure": "cuda max_memory_allocated - model" if cuda else "ru_maxrss after run - after build",
        "scores": scores,
    }


def _run_in_subprocess(config: dict[str, Any], method: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = (
            "import json, sys\n"
            "from poft_ds.bench.scoring import _run_method\n"
            "result = _run_method(json.loads(sys.argv[1]), sys.argv[2])\n"
            "open(sys.argv[3], 'w').write(json.dumps(result))\n"
        )
        subprocess.run([sys.executable, "-c", code, json.dumps(config), method, out], check=True)
        with open(out) as f:
            return json.load(f)


def scoring_throughput(
    n_samples: int = 48,
    median_tokens: int = 200,
    sigma: float = 0.7,
    max_length: int = 1024,
    response_fraction: float = 0.4,
    vocab_size: int = 32000,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    max_tokens: int = 4096,
    baseline_batch_size: int = 4,
    chunk_tokens: int = 2048,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    isolate: bool = True,
) -> dict[str, Any]:
    """Throughput, agreement and peak memory of poft-ds's scorer against the pad-to-max baseline.

    The CPU defaults scale the issue's distribution (median 800, cap 4096) down by 4 and use a tiny
    model, so both methods finish in minutes on two cores; `FULL` holds the issue's sizes.

    Args:
        n_samples: Synthetic samples scored by both methods.
        median_tokens: Median sample length (log-normal).
        sigma: Log-normal sigma of the lengths.
        max_length: Length cap, and the width the baseline pads every sample to.
        response_fraction: Trailing share of each sample that is response (scored) tokens.
        vocab_size: Vocabulary of the model (the output head's rows).
        hidden_size: Model width.
        intermediate_size: MLP width.
        layers: Decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (None: `heads`).
        max_tokens: poft-ds's packed-batch token budget.
        baseline_batch_size: Samples per pad-to-max-length forward pass.
        chunk_tokens: poft-ds's output-head chunk (`model.head_chunk_tokens`, default 2048).
        device: "cpu" or "cuda" (None: cuda when available).
        dtype: Model dtype, e.g. "float32" or "bfloat16" (None: bf16 on GPU, fp32 on CPU).
        seed: Seed of the lengths, token ids and model weights.
        isolate: Run each method in a fresh subprocess. False runs both here (faster to start,
            for tests); CPU peak memory is then not measured (None), since `ru_maxrss` is the
            whole process's high-water mark.

    Returns:
        A JSON-ready dict: the config, each method's seconds, tokens, real tokens/s and peak
        scoring memory, the throughput ratio, and the largest per-sample score difference.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    config = {
        "n_samples": n_samples,
        "median_tokens": median_tokens,
        "sigma": sigma,
        "max_length": max_length,
        "response_fraction": response_fraction,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads or heads,
        "max_tokens": max_tokens,
        "baseline_batch_size": baseline_batch_size,
        "chunk_tokens": chunk_tokens,
        "device": device,
        "dtype": dtype,
        "attn_implementation": "sdpa",
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
    }
    runs = {m: _run_in_subprocess(config, m) if isolate else _run_method(config, m) for m in METHODS}
    if not isolate and not device.startswith("cuda"):
        for run in runs.values():
            run["peak_scoring_bytes"], run["peak_memory_measure"] = None, "not measured (not isolated)"
    base, ours = runs["pad_to_max_length"], runs["poft_ds"]
    diff = max(abs(a - b) for a, b in zip(base.pop("scores"), ours.pop("scores")))
    return {
        "config": config,
        "methods": runs,
        "throughput_ratio": ours["real_tokens_per_s"] / base["real_tokens_per_s"],
        "max_abs_score_diff": diff,
        "peak_memory_ratio": (
            base["peak_scoring_bytes"] / max(ours["peak_scoring_bytes"], 1)
            if ours["peak_scoring_bytes"] is not None
            else None
        ),
    }
