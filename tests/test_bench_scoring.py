"""`poft-ds bench scoring` at a tiny size: both scorers agree and the result has its fields.

Speed ratios are not asserted here: they are checked by running the benchmark at its sizes.
"""

from poft_ds.bench.scoring import METHODS, scoring_throughput


def test_scoring_bench_methods_agree_and_report_their_fields() -> None:
    result = scoring_throughput(
        n_samples=6,
        median_tokens=40,
        max_length=128,
        vocab_size=500,
        hidden_size=32,
        intermediate_size=64,
        layers=1,
        heads=2,
        max_tokens=256,
        baseline_batch_size=2,
        chunk_tokens=16,  # several output-head chunks per packed batch
        device="cpu",
        isolate=False,  # two fresh interpreters would cost more than the benchmark itself
    )
    assert result["max_abs_score_diff"] <= 1e-4
    assert result["config"]["attn_implementation"] == "sdpa" and result["config"]["dtype"] == "float32"
    assert set(result["methods"]) == set(METHODS)
    for run in result["methods"].values():
        for key in ("seconds", "real_tokens", "processed_tokens", "head_positions", "real_tokens_per_s"):
            assert run[key] > 0, key
        assert "peak_scoring_bytes" in run and "float32_logits_peak_bytes" in run
        assert run["real_tokens"] == result["methods"]["poft_ds"]["real_tokens"]
    base, ours = result["methods"]["pad_to_max_length"], result["methods"]["poft_ds"]
    assert base["processed_tokens"] == 6 * 128 and ours["processed_tokens"] == ours["real_tokens"]
    assert ours["head_positions"] < ours["real_tokens"]  # the head runs at response positions only
    assert result["throughput_ratio"] > 0
