"""Build the benchmark's local assets (offline, deterministic): python build_assets.py cpu|gpu [folder].

`cpu`: the tiny models and chats of `poft_ds.tiny` (as the quickstart), default ../../runs/bench-assets/cpu.
`gpu`: a randomly initialised Llama-shaped target of about 0.48B parameters and two aligned models of
the same shape (one on the target's tokenizer and chat template, one on another tokenizer with the
zephyr template), saved in bf16 with `save_pretrained`, plus synthetic chats long enough to fill
2048-token samples; default ../../runs/bench-assets/gpu. Random weights: the benchmark measures
cost, not quality, and no model hub is needed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from poft_ds.tiny import build_assets

HERE = Path(__file__).resolve().parent

# Llama-shaped, ~0.48B parameters: 32 layers x 12.85M (attention 4 x 1024^2, SwiGLU MLP
# 3 x 1024 x 2816, two norms) + untied input embedding and output head of 32000 x 1024 each.
GPU_SHAPE = {
    "hidden_size": 1024,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 2816,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def parameters(shape: dict) -> int:
    """Parameters of a Llama of this shape (embedding, layers, final norm, output head)."""
    h, f, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return v * h + n * layer + h + (0 if shape["tie_word_embeddings"] else v * h)


def _long_chats(n: int, seed: int, words: int) -> list[dict]:
    """Multi-turn chats of roughly `words` words each, from a fixed vocabulary (lengths vary, as in SFT data)."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "so", "tu") for b in ("n", "r", "s", "t", "")]
    rows = []
    for i in range(n):
        total = int(words * rng.uniform(0.3, 1.0))
        turns = rng.randint(1, 3)
        messages = []
        for _ in range(turns):
            q = " ".join(rng.choice(vocab) for _ in range(max(4, total // (turns * 6))))
            a = " ".join(rng.choice(vocab) for _ in range(max(8, total // turns - total // (turns * 6))))
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"id": f"long-{i}", "messages": messages})
    return rows


def build_gpu_assets(folder: Path, n_rows: int = 1536, seed: int = 0) -> Path:
    """Random ~0.48B Llamas sharing the tiny assets' tokenizers, and long synthetic chats."""
    tiny = build_assets(folder / "tiny", n_rows=64, seed=seed, fit_steps=1)  # only its tokenizers are used
    (folder / "data").mkdir(parents=True, exist_ok=True)
    with open(folder / "data" / "train.jsonl", "w") as f:
        for row in _long_chats(n_rows, seed, words=600):  # ~600-2000 tokens under the tiny tokenizers
            f.write(json.dumps(row) + "\n")
    for name, tok_from, model_seed in (
        ("target", "target", seed + 1),
        ("aligned_chatml", "aligned_chatml", seed + 2),
        ("aligned_zephyr", "aligned_zephyr", seed + 3),
    ):
        tok = AutoTokenizer.from_pretrained(tiny / tok_from)
        torch.manual_seed(model_seed)
        config = LlamaConfig(
            **GPU_SHAPE,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # the vocabulary is larger than the tokenizer's: fine
        n = sum(p.numel() for p in model.parameters())
        assert n == parameters(GPU_SHAPE), (n, parameters(GPU_SHAPE))
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        print(f"{folder / name}: {n / 1e9:.3f}B parameters (bf16)")
        del model
    return folder


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    root = HERE.parent.parent / "runs" / "bench-assets"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else root / kind
    if kind == "cpu":
        print(f"tiny assets written to {build_assets(out)}")
    elif kind == "gpu":
        print(f"~{parameters(GPU_SHAPE) / 1e9:.2f}B-parameter assets written to {build_gpu_assets(out)}")
    else:
        sys.exit("usage: python build_assets.py cpu|gpu [folder]")
