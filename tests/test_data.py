"""Response masks against hand-written token layouts, and bad rows reported by file and line."""

import json
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from poft_ds.data import ChatTokenizer, DataError, load_rows, tokenize_rows
from poft_ds.tiny import ZEPHYR_TEMPLATE

THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Mistral-7B-v0.1's real SentencePiece tokenizer, shipped offline by `mistral-common`."""
    mistral_common = pytest.importorskip("mistral_common")
    folder = tmp_path_factory.mktemp("mistral")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 32000
    return tok


def test_zephyr_mask_with_real_mistral_tokenizer_marks_assistant_content_and_eos(mistral_tokenizer) -> None:
    chat = ChatTokenizer(mistral_tokenizer, max_length=512, chat_template=ZEPHYR_TEMPLATE)
    sample, reason = chat(THREE_TURNS)
    assert reason is None
    tokens = mistral_tokenizer.convert_ids_to_tokens(sample.input_ids)
    # The template writes no BOS; the tokenizer's add_bos_token puts it first.
    assert tokens[0] == "<s>" and not sample.response_mask[0]
    marked = [t for t, m in zip(tokens, sample.response_mask) if m]
    # Hand-written: each assistant turn's SentencePiece pieces, then its closing eos.
    assert marked == [
        "Hello",
        "!",
        "▁How",
        "▁can",
        "▁I",
        "▁help",
        "?",
        "</s>",
        "Blue",
        ".",
        "</s>",
        "Green",
        ".",
        "</s>",
    ]
    # Everything else (system, user turns, role headers, newlines after eos) is masked out.
    runs, current = [], []
    for t, m in zip(tokens, sample.response_mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    assert len(runs) == 3
    for run in runs:
        idx = tokens.index(run[0])
        assert tokens[idx - 1] == "<0x0A>" and tokens[idx - 2] == ">"  # "<|assistant|>\n" precedes
    eos_positions = [i for i, t in enumerate(tokens) if t == "</s>"]
    assert [sample.response_mask[i] for i in eos_positions] == [False, False, True, False, True, False, True]


def test_chatml_mask_on_tiny_tokenizer(assets: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets / "target")
    sample, _ = ChatTokenizer(tok, max_length=512)(THREE_TURNS)
    text = "".join(tok.decode([i]) for i, m in zip(sample.input_ids, sample.response_mask) if m)
    assert text == "Hello! How can I help?<|im_end|>Blue.<|im_end|>Green.<|im_end|>"


def test_truncation_keeps_what_fits_and_counts_samples_left_with_no_response(assets: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets / "target")
    full, _ = ChatTokenizer(tok, max_length=512)(THREE_TURNS)
    prompt_len = full.response_mask.index(True)
    cut, reason = ChatTokenizer(tok, max_length=prompt_len + 3)(THREE_TURNS)
    assert reason is None and len(cut.input_ids) == prompt_len + 3 and sum(cut.response_mask) == 3
    none, reason = ChatTokenizer(tok, max_length=prompt_len)(THREE_TURNS)
    assert none is None and reason == "no response token within max_length"


def test_template_that_rewrites_history_is_rejected_not_mis_masked(assets: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets / "target")
    # Drops earlier assistant turns' content (as reasoning templates do with their thoughts).
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match="assistant turn 2"):
        ChatTokenizer(tok, max_length=512, chat_template=template)(THREE_TURNS)


def test_corrupted_jsonl_names_every_bad_row(tmp_path: Path, assets: Path) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    lines = [
        json.dumps(good),
        json.dumps({"messages": [{"role": "user", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}),
        json.dumps({"messages": [{"role": "robot", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}]}),
        json.dumps({"text": "no messages"}),
        json.dumps(good)[:-7],  # truncated last line
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    rows = load_rows([str(path)])
    assert len(rows) == 7  # nothing dropped
    tok = AutoTokenizer.from_pretrained(assets / "target")
    samples, report = tokenize_rows(rows, ChatTokenizer(tok, max_length=64))
    assert samples[0] is not None and all(s is None for s in samples[1:])
    where = {r: ex for r, ex in report.examples.items()}
    assert where["no assistant turn"] == [f"{path}:2"]
    assert where["empty assistant content"] == [f"{path}:3"]
    assert sorted(where["turn 0 is not a {role: system|user|assistant, content: str} mapping"]) == [
        f"{path}:4",
        f"{path}:5",
    ]
    assert where["no 'messages' field"] == [f"{path}:6"]
    assert any(k.startswith("malformed JSON") and v == [f"{path}:7"] for k, v in where.items())
    assert sum(report.counts.values()) == 6


def test_json_and_parquet_files_load_like_jsonl(tmp_path: Path, assets: Path) -> None:
    import datasets

    rows = [json.loads(x) for x in (assets / "data" / "train.jsonl").read_text().splitlines()[:5]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows]).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.parquet"):
        loaded = load_rows([os.fspath(tmp_path / name)])
        assert [r.messages for r in loaded] == [r["messages"] for r in rows]
