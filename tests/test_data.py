"""Response masks against hand-written token layouts, and bad rows reported by file and line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import UNDETECTED, load_rows, read_source
from poft_ds.data.tokenize import tokenize_rows
from poft_ds.spec import SourceSpec
from poft_ds.tiny import ZEPHYR_TEMPLATE
from tests.conftest import base_spec, write_spec

THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


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
    # Still usable, but the response tokens cut off are counted.
    assert full.lost_response_tokens == 0 and cut.lost_response_tokens == sum(full.response_mask) - 3
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
    # The row is unusable, with a reason naming the turn; it does not stop the job.
    sample, reason = ChatTokenizer(tok, max_length=512, chat_template=template)(THREE_TURNS)
    assert sample is None and reason == "chat template rewrites assistant turn 2's content"


def test_corrupted_jsonl_names_every_bad_row(tmp_path: Path, assets: Path) -> None:
    def good(i: str) -> str:
        return json.dumps(
            {"id": i, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        )

    lines = [
        good("r1").encode(),
        json.dumps({"id": "r2", "messages": [{"role": "user", "content": "a"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}).encode(),
        json.dumps({"messages": [{"role": "robot", "content": "a"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
        json.dumps({"text": "no messages"}).encode(),
        good("r1").encode(),  # duplicate id
        b'{"messages": "caf\xe9"}',  # Latin-1 bytes, not UTF-8
        good("r9").encode()[:-7],  # truncated last line
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))
    rows = load_rows([str(path)])
    assert len(rows) == 9  # nothing dropped
    tok = AutoTokenizer.from_pretrained(assets / "target")
    samples, report = tokenize_rows(rows, ChatTokenizer(tok, max_length=64))
    assert samples[0] is not None and all(s is None for s in samples[1:])
    where = dict(report.examples)
    assert where.pop("no assistant turn") == [f"{path}:2"]
    assert where.pop("turn 2: empty response") == [f"{path}:3"]
    assert where.pop("turn 1: unknown role 'robot'") == [f"{path}:4"]
    assert where.pop("turn 1: content is a number") == [f"{path}:5"]
    assert where.pop(UNDETECTED) == [f"{path}:6"]
    assert where.pop("duplicate id") == [f"{path}:7"]
    assert where.pop("undecodable (not UTF-8)") == [f"{path}:8"]
    ((reason, rows_),) = where.items()
    assert reason.startswith("malformed JSON") and rows_ == [f"{path}:9"]
    assert sum(report.counts.values()) == 8


def test_every_format_becomes_the_same_conversation(tmp_path: Path) -> None:
    system, user, answer = "Be brief.", "Say hi", "hi"
    expected = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    files = {
        "messages.jsonl": {"messages": expected},
        "sharegpt.jsonl": {
            "conversations": [
                {"from": "system", "value": system},
                {"from": "human", "value": user},
                {"from": "gpt", "value": answer},
            ]
        },
        "alpaca.jsonl": {"instruction": user, "input": "", "output": answer, "system": system},
        "pc.jsonl": {"prompt": user, "completion": answer, "system": system},
        "renamed.jsonl": {"chat": expected},
    }
    for name, rec in files.items():
        (tmp_path / name).write_text(json.dumps(rec) + "\n")
    for name in ("messages.jsonl", "sharegpt.jsonl", "alpaca.jsonl", "pc.jsonl"):
        (row,) = read_source(str(tmp_path / name))
        assert row.messages == expected, name
    (row,) = read_source(str(tmp_path / "renamed.jsonl"), "messages", {"messages": "chat"})
    assert row.messages == expected
    (tmp_path / "alpaca_input.jsonl").write_text(json.dumps({"instruction": "Sum", "input": "1 2", "output": "3"}))
    (row,) = read_source(str(tmp_path / "alpaca_input.jsonl"))
    assert row.messages == [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    # Spreadsheet exports: CSV (quoted cells with commas, whitespace kept) and TSV, rows named by line.
    (tmp_path / "alpaca.csv").write_text(
        'instruction,input,output\nSay hi,,hi\n" Add, please ",1 2,"3 "\nEmpty answer,x,\n'
    )
    rows = read_source(str(tmp_path / "alpaca.csv"))
    assert rows[0].messages == [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    assert rows[1].messages[0]["content"] == " Add, please \n\n1 2" and rows[1].messages[1]["content"] == "3 "
    assert (rows[2].where, rows[2].problem is not None) == (f"{tmp_path / 'alpaca.csv'}:4", True)
    (tmp_path / "pc.tsv").write_text("prompt\tcompletion\nSay hi\thi\n")
    (row,) = read_source(str(tmp_path / "pc.tsv"))
    assert row.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    (tmp_path / "sharegpt_bad.jsonl").write_text(json.dumps({"conversations": [{"from": "alien", "value": "x"}]}))
    (row,) = read_source(str(tmp_path / "sharegpt_bad.jsonl"), "sharegpt")
    assert row.problem == "turn 1: unknown role 'alien' (sharegpt)"


def test_source_weights_repeat_and_sample_rows(tmp_path: Path) -> None:
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(rec) for _ in range(10)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(rec) for _ in range(10)))
    sources = [
        SourceSpec(path=str(tmp_path / "a.jsonl"), weight=2.0),
        SourceSpec(path=str(tmp_path / "b.jsonl"), weight=0.3),
    ]
    rows = load_rows(sources, seed=1)
    assert sum(r.source.endswith("a.jsonl") for r in rows) == 20
    assert sum(r.source.endswith("b.jsonl") for r in rows) == 3
    assert [r.line for r in load_rows(sources, seed=1)] == [r.line for r in rows]


def test_truncation_policies(assets: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets / "target")
    full, _ = ChatTokenizer(tok, max_length=512)(THREE_TURNS)
    n = len(full.input_ids) - 5
    left, _ = ChatTokenizer(tok, max_length=n, truncation="left")(THREE_TURNS)
    assert left.input_ids == full.input_ids[5:] and left.response_mask == full.response_mask[5:]
    right, _ = ChatTokenizer(tok, max_length=n, truncation="right")(THREE_TURNS)
    assert right.input_ids == full.input_ids[:n]
    assert ChatTokenizer(tok, max_length=n, truncation="drop")(THREE_TURNS) == (None, "too long")


def test_template_with_generation_markers_that_rewrites_history_is_masked_by_its_markers(assets: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets / "target")
    # Like reasoning models' templates: earlier assistant turns lose their <think> part.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ (m['content'].split('</think>')[-1] if not loop.last else m['content']) + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>one plus one</think>2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>two and two</think>4"},
    ]
    sample, _ = ChatTokenizer(tok, max_length=512, chat_template=template)(msgs)
    marked = "".join(tok.decode([i]) for i, m in zip(sample.input_ids, sample.response_mask) if m)
    assert marked == "2<|im_end|><think>two and two</think>4<|im_end|>"


def test_json_and_parquet_files_load_like_jsonl(tmp_path: Path, assets: Path) -> None:
    import datasets

    rows = [json.loads(x) for x in (assets / "data" / "train.jsonl").read_text().splitlines()[:5]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "d.arrow")
    for name in ("d.json", "d.parquet", "d.arrow"):
        loaded = load_rows([os.fspath(tmp_path / name)])
        assert [r.messages for r in loaded] == [r["messages"] for r in rows]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poft_ds.cli", *args], capture_output=True, text=True, timeout=300)


def test_data_inspect_reports_bad_rows_and_refuses_above_the_threshold(assets: Path, tmp_path: Path) -> None:
    lines = (assets / "data" / "train.jsonl").read_text().splitlines()[:20]
    lines[3] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    lines[7] = lines[7][:-10]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    spec = base_spec(assets, tmp_path / "run", data={"train_files": [str(tmp_path / "d.jsonl")]})
    proc = _cli("data", "inspect", str(write_spec(spec, tmp_path / "job.yaml")), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stderr
    assert "d.jsonl:4" in proc.stdout and "d.jsonl:8" in proc.stdout and "REFUSE" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows"] == 20 and report["usable_by_all_models"] == 18
    assert report["models"]["zephyr"]["outcomes"]["no assistant turn"] == 1
    assert report["models"]["target"]["truncated_responses"].keys() == {"samples", "tokens"}
    assert "[[" in report["models"]["target"]["masked_sample"]
    spec["data"]["max_bad_fraction"] = 0.2
    assert _cli("data", "inspect", str(write_spec(spec, tmp_path / "job.yaml"))).returncode == 0


def test_validate_rejects_a_template_that_cannot_be_masked(assets: Path, tmp_path: Path) -> None:
    spec = base_spec(assets, tmp_path / "run")
    # Renders only the last message: earlier turns vanish, so prefixes do not match.
    spec["aligned_models"][1]["chat_template"] = "{{ messages[-1]['content'] }}"
    proc = _cli("validate", str(write_spec(spec, tmp_path / "job.yaml")))
    assert proc.returncode == 2
    assert "aligned_models[1].chat_template" in proc.stderr and "zephyr" in proc.stderr


def test_tokenization_is_cached_by_content(assets: Path, tmp_path: Path) -> None:
    class Counting(ChatTokenizer):
        calls = 0

        def __call__(self, messages):
            Counting.calls += 1
            return super().__call__(messages)

    tok = AutoTokenizer.from_pretrained(assets / "target")
    rows = load_rows([str(assets / "data" / "train.jsonl")])[:20]
    rows[3].messages, rows[3].problem = None, "no assistant turn"
    first, report1 = tokenize_rows(rows, Counting(tok, 96), tmp_path)
    assert Counting.calls == 19
    again, report2 = tokenize_rows(rows, Counting(tok, 96), tmp_path)
    assert Counting.calls == 19  # read from the cache
    assert again == first and report2.counts == report1.counts == {"no assistant turn": 1}
    cut, _ = tokenize_rows(rows, Counting(tok, 40), tmp_path)  # lost response tokens survive the cache
    assert any(s.lost_response_tokens for s in cut if s)
    assert tokenize_rows(rows, Counting(tok, 40), tmp_path)[0] == cut
    tokenize_rows(rows, Counting(tok, 64), tmp_path)  # another max length: another entry
    assert Counting.calls == 57 and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_preference_pairs_in_every_common_layout_become_chosen_and_rejected_conversations(tmp_path: Path) -> None:
    system, q = " Be brief. ", "  What is 2 plus 2?\n"  # whitespace is content: kept as it is
    user = {"role": "user", "content": q}
    good, bad = {"role": "assistant", "content": " 4 "}, {"role": "assistant", "content": "5\n"}
    records = [
        # TRL's standard form: strings.
        {"prompt": q, "chosen": " 4 ", "rejected": "5\n"},
        # TRL's conversational form: a prompt list, responses continuing it.
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        # UltraFeedback-binarized: a prompt string and whole conversations repeating it.
        {"prompt": q, "chosen": [user, good], "rejected": [user, bad], "score_chosen": 8.0},
        # Whole conversations alone, with a system field.
        {
            "system": system,
            "chosen": [{"role": "system", "content": system}, user, good],
            "rejected": [{"role": "system", "content": system}, user, bad],
        },
        {"prompt": q, "chosen": " 4 "},
        {"prompt": q, "chosen": [user, good], "rejected": [{"role": "user", "content": "other"}, bad]},
        {"prompt": q, "chosen": [user], "rejected": [user, bad]},
        {"chosen": [good], "rejected": [bad]},
        {"messages": [user, good]},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = read_source(str(path))
    for r in rows[:3]:
        assert (r.problem, r.messages, r.rejected) == (None, [user, good], [user, bad])
    sys_turn = {"role": "system", "content": system}
    assert (rows[3].messages, rows[3].rejected) == ([sys_turn, user, good], [sys_turn, user, bad])
    assert [r.problem for r in rows[4:8]] == [
        "'rejected' missing",
        "chosen and rejected follow different prompts",
        "'chosen' does not end with an assistant turn",
        "no prompt (no user turn before the response)",
    ]
    # SFT and PoFT train on the chosen conversation; DPO gets both, chosen at 2i, rejected at 2i+1.
    assert load_rows([str(path)])[0].messages == [user, good]
    pairs = load_rows([str(path)], pairs=True)
    assert len(pairs) == 2 * len(records)
    assert [(pairs[2 * i].messages, pairs[2 * i + 1].messages) for i in range(3)] == [([user, good], [user, bad])] * 3
    assert pairs[8].problem == pairs[9].problem == "'rejected' missing"
    assert pairs[16].problem == pairs[17].problem == "not a preference pair (no 'chosen' and 'rejected')"
    assert pairs[17].where == f"{path}:9"


def test_last_turn_only_masks_the_final_response_alone(assets: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets / "target")
    msgs = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "\nHi there. "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4\n"},
    ]

    def trained(last_turn_only: bool) -> str:
        s, _ = ChatTokenizer(tok, 512, last_turn_only=last_turn_only)(msgs)
        return tok.decode([i for i, m in zip(s.input_ids, s.response_mask) if m])

    # Every assistant turn and its end-of-turn token (SFT, PoFT), or the final one alone (DPO's response).
    assert trained(False) == "\nHi there. <|im_end|> 4\n<|im_end|>"
    assert trained(True) == " 4\n<|im_end|>"
