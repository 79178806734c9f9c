"""Tiny local assets for the quickstart, the tests and CPU benchmarks: no hub, no network.

`build_assets(folder)` writes, deterministically for a given seed:

  * `target/`        a random 2-layer Llama with a byte-level BPE tokenizer and a ChatML template;
  * `aligned_chatml/` a 2-layer Llama on the same tokenizer and template, briefly trained on the
                     clean conversations (so it is "aligned": it prefers correct answers);
  * `aligned_zephyr/` a 2-layer Llama on a *different* tokenizer (other vocabulary and special
                     tokens) with the zephyr chat template, trained the same way;
  * `data/train.jsonl` synthetic arithmetic chats: single- and multi-turn, some with a system
                     prompt, and some noisy rows with wrong answers;
  * `data/preferences.jsonl` arithmetic preference pairs (right answer chosen, wrong rejected)
                     in the layouts of TRL and UltraFeedback, for DPO.

Everything is saved with `save_pretrained`, so the real loading code runs on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The zephyr-7b template (HuggingFaceH4/zephyr-7b-beta), as the paper's aligned models use it.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

SYSTEM_PROMPTS = ["You are a careful math tutor.", "Answer briefly.", "You are a helpful assistant."]
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def _question(rng: random.Random) -> tuple[int, str, int, int]:
    """An arithmetic question (a, op, b) and its answer."""
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    op = rng.choice(list(OPS))
    return a, op, b, OPS[op](a, b)


def _wrong(rng: random.Random, right: int) -> int:
    """A wrong answer near the right one."""
    return right + rng.randint(1, 9) * rng.choice([-1, 1])


def synthetic_conversations(n: int, seed: int, noisy_fraction: float = 0.15) -> list[dict]:
    """Arithmetic chats; a `noisy_fraction` of them have wrong answers (marked `noisy: true`)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, op, b, result = _question(rng)
        noisy = rng.random() < noisy_fraction
        answer = _wrong(rng, result) if noisy else result
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        msgs.append({"role": "user", "content": f"What is {a} {op} {b}?"})
        msgs.append({"role": "assistant", "content": f"{a} {op} {b} is {answer}."})
        if rng.random() < 0.4:
            c = rng.randint(2, 5)
            msgs.append({"role": "user", "content": f"And that times {c}?"})
            msgs.append({"role": "assistant", "content": f"{answer} times {c} is {answer * c}."})
        rows.append({"id": f"q{i:05d}", "messages": msgs, "noisy": noisy})
    return rows


def _bpe_tokenizer(corpus: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _render_all(rows: list[dict], template: str, hf_tok: PreTrainedTokenizerFast) -> list[str]:
    return [hf_tok.apply_chat_template(r["messages"], chat_template=template, tokenize=False) for r in rows]


def _tiny_llama(
    vocab_size: int,
    seed: int,
    bos: int,
    eos: int,
    pad: int,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """A random 2-layer Llama (the width can grow for examples that must learn more)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return LlamaForCausalLM(cfg)


def _fit(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, texts: list[str], steps: int, seed: int) -> None:
    """A few plain language-modelling steps so an 'aligned' model prefers the clean data."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(texts), (16,), generator=g).tolist()
        enc = tok([texts[i] for i in pick], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _save(folder: Path, model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def synthetic_preferences(n: int, seed: int) -> list[dict]:
    """Arithmetic preference pairs: the chosen answer is right, the rejected one wrong and hedged.

    The layouts users bring, in turn: TRL's strings (prompt/chosen/rejected), TRL's message
    lists, UltraFeedback-binarized whole conversations, and a multi-turn prompt; some contents
    carry leading or trailing whitespace.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, op, b, right = _question(rng)
        wrong = _wrong(rng, right)
        q = f"What is {a} {op} {b}?" + (" " if i % 5 == 0 else "")
        # The wrong answers hedge, as dispreferred responses often do: a preference a tiny model can learn.
        good, bad = f"{a} {op} {b} is {right}.", (" " if i % 3 == 0 else "") + f"{a} {op} {b} is {wrong}, I guess."
        user = {"role": "user", "content": q}
        layout = i % 4
        if layout == 0:
            row = {"prompt": q, "chosen": good, "rejected": bad}
        elif layout == 1:
            row = {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        elif layout == 2:
            row = {
                "prompt": q,
                "chosen": [user, {"role": "assistant", "content": good}],
                "rejected": [user, {"role": "assistant", "content": bad}],
            }
        else:
            earlier = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "\nHi, ask away. "}]
            row = {
                "system": rng.choice(SYSTEM_PROMPTS),
                "prompt": [*earlier, user],
                "chosen": good,
                "rejected": bad,
            }
        rows.append({"id": f"p{i:05d}", **row})
    return rows


def build_assets(folder: str | Path, n_rows: int = 192, seed: int = 0, fit_steps: int = 40) -> Path:
    """Write the tiny models and data set under `folder` (see the module docstring).

    Args:
        folder: Output folder.
        n_rows: Conversations in `data/train.jsonl`.
        seed: Seed for data, tokenizers' data and weights.
        fit_steps: Training steps for each aligned model.

    Returns:
        The folder.
    """
    folder = Path(folder)
    rows = synthetic_conversations(n_rows, seed)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    with open(folder / "data" / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(folder / "data" / "preferences.jsonl", "w") as f:
        for r in synthetic_preferences(n_rows, seed + 7):
            f.write(json.dumps(r) + "\n")
    clean = [r for r in rows if not r["noisy"]]
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    plain = [m["content"] for r in rows for m in r["messages"]]
    chatml_specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok_a = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(plain + ["system user assistant"], 400, chatml_specials),
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok_a.chat_template = CHATML_TEMPLATE
    zephyr_specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok_b = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(plain, 300, zephyr_specials),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tok_b.chat_template = ZEPHYR_TEMPLATE

    def ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
        return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}

    _save(folder / "target", _tiny_llama(len(tok_a), seed + 1, **ids(tok_a)), tok_a)
    aligned_a = _tiny_llama(len(tok_a), seed + 2, **ids(tok_a))
    _fit(aligned_a, tok_a, _render_all(clean, CHATML_TEMPLATE, tok_a), fit_steps, seed + 2)
    _save(folder / "aligned_chatml", aligned_a, tok_a)
    aligned_b = _tiny_llama(len(tok_b), seed + 3, **ids(tok_b))
    _fit(aligned_b, tok_b, _render_all(clean, ZEPHYR_TEMPLATE, tok_b), fit_steps, seed + 3)
    _save(folder / "aligned_zephyr", aligned_b, tok_b)
    return folder
