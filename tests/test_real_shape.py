"""Distributed runs at the shape that matters, against plain single-process PyTorch.

Every weight is partitioned by ZeRO-3 (persistence threshold 0), the output head works in chunks
of 8 response positions, and one sample of each global batch spans three chunks while the others
fit in one, so the ranks of a role see unequal loads in the same pass. One optimizer step on 2
trainers with gradient accumulation must give the weights of a plain PyTorch AdamW step on the
whole batch, for PoFT and for SFT.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import load_rows
from poft_ds.scoring import ResponseScorer, check_head
from tests.conftest import base_spec, read_metrics, run_job
from tests.test_e2e import dumped_scores, single_process_scores
from tests.test_scoring import plain_scores

pytestmark = pytest.mark.distributed

CHUNK = 8
MAX_LENGTH = 160
# Adam's first step is lr * g / (|g| + eps): with eps = 1 it is nearly linear in the gradient, so a
# wrong normalisation of the loss shows in the weights (with eps = 1e-8 it would be sign(g) * lr).
STEP = {
    "learning_rate": 1.0,
    "adam_eps": 1.0,
    "lr_schedule": "constant",
    "max_grad_norm": 0.0,
    "micro_batch_size": 1,
    "global_batch_size": 8,
    "max_steps": 1,
}

LONG_ANSWER = (
    "3 plus 4 is 7. 7 times 2 is 14. 14 minus 5 is 9. 9 plus 8 is 17. 17 times 3 is 51. "
    "51 minus 6 is 45. 45 plus 2 is 47.\n"
)


def unequal_rows() -> list[dict]:
    """8 conversations: one answer three head chunks long, seven short ones; whitespace at the edges."""
    rows = [
        {"messages": [{"role": "user", "content": " Chain some sums? "}, {"role": "assistant", "content": LONG_ANSWER}]}
    ]
    for i in range(7):
        a, b = 2 + i, 11 + 3 * i
        answer = f" {a + b}." if i % 2 else f"{a + b}.\n"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?\n"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def unequal_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unequal") / "unequal.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unequal_rows()))
    return path


# The tiny target's ChatML template, plus the role-alternation check of Mistral-style templates.
ALTERNATING_CHATML = (
    "{% set ns = namespace(prev='') %}{% for m in messages %}"
    "{% if m['role'] == ns.prev %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% set ns.prev = m['role'] %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def response_positions(model_dir: Path, data: Path) -> list[int]:
    """Scored positions of each row under a model's tokenizer and template."""
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(model_dir), MAX_LENGTH)
    return [sum(chat(r.messages)[0].response_mask[1:]) for r in load_rows([str(data)])]


def plain_step(model_dir: Path, data: Path, loss_of, trust_remote_code: bool = False) -> tuple[dict, float]:
    """One torch AdamW step on the whole batch in one process: the updated weights and the grad norm."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    chat = ChatTokenizer(tok, MAX_LENGTH)
    logp, tokens = [], []
    for row in load_rows([str(data)])[:8]:  # the global batch (a 9th row, if any, is one a template refuses)
        s, _ = chat(row.messages)
        ids, mask = torch.tensor([s.input_ids]), torch.tensor([s.response_mask])
        n = mask[:, 1:].sum()
        logp.append(plain_scores(model, ids, torch.ones_like(ids), mask)[0] * n)
        tokens.append(n)
    loss = loss_of(torch.stack(logp), torch.stack(tokens).double())
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    opt = torch.optim.AdamW(model.parameters(), lr=STEP["learning_rate"], eps=STEP["adam_eps"], weight_decay=0.0)
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, grad_norm


def assert_weights_equal(final_model: Path, expected: dict) -> None:
    trained = load_file(final_model / "model.safetensors")
    assert trained.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-5, msg=k)


def assert_partitioned(run_dir: Path, role: str, ranks: int) -> None:
    """Each rank of the role holds a strict part of every weight, and together they hold all of it."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]
    mine = [r for r in records if r["role"] == role]
    assert len(mine) == ranks
    by_name = {}
    for r in mine:
        for p in r["params"]:
            by_name.setdefault(p["name"], []).append(p)
    assert any(len(v[0]["shape"]) == 2 for v in by_name.values())
    for name, parts in by_name.items():
        assert all(not p["persistent"] and p["local"] < p["numel"] for p in parts), (role, name)
        assert sum(p["local"] for p in parts) >= parts[0]["numel"], (role, name)


def test_poft_step_at_real_shape_equals_plain_pytorch(assets: Path, unequal_data: Path, tmp_path: Path) -> None:
    # The shape the test relies on: one sample spans 3 head chunks, every other sample 1.
    for model in ("target", "aligned_zephyr"):
        positions = response_positions(assets / model, unequal_data)
        assert positions[0] > 2 * CHUNK and all(n <= CHUNK for n in positions[1:]), (model, positions)

    zephyr = {
        "name": "zephyr",
        "path": str(assets / "aligned_zephyr"),
        "ranks": 2,
        "score_batch_size": 1,
        "head_chunk_tokens": CHUNK,
    }
    spec = base_spec(
        assets,
        tmp_path / "run",
        model={"path": str(assets / "target"), "max_length": MAX_LENGTH, "head_chunk_tokens": CHUNK},
        aligned_models=[zephyr],
        data={"train_files": [str(unequal_data)]},
        # Trainers pack their micro-batches padding-free (the long sample shares a row with others).
        training=dict(STEP, max_tokens_per_micro_batch=MAX_LENGTH),
        topology={"procs_per_node": 4},
        logging={"dump_scores": True},
    )
    run_dir = run_job(spec, tmp_path)
    assert_partitioned(run_dir, "trainer", 2)
    assert_partitioned(run_dir, "ref/zephyr", 2)

    # The reference group's scores equal a single-process computation (aligned max_length is the target's).
    expected_ref = single_process_scores(assets / "aligned_zephyr", unequal_data, list(range(8)), MAX_LENGTH)
    dumped = dumped_scores(run_dir)
    assert sorted(d["row"] for d in dumped) == list(range(8))
    for d in dumped:
        assert d["scores"]["zephyr"] == pytest.approx(expected_ref[d["row"]], abs=1e-5)

    s_ref = torch.tensor([expected_ref[i] for i in range(8)], dtype=torch.float64)

    def poft(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(logp / tokens - s_ref).mean()  # beta 1, gamma 0

    weights, grad_norm = plain_step(assets / "target", unequal_data, poft)
    assert_weights_equal(run_dir / "final_model", weights)
    (m,) = read_metrics(run_dir)
    assert m["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


MODELING_SCALED = '''
from transformers import LlamaForCausalLM


class ScaledHeadLlamaForCausalLM(LlamaForCausalLM):
    """A Llama whose forward rescales and shifts the output head's logits (a custom head transform)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5 + 0.01 * out.logits.square()
        return out
'''


@pytest.fixture(scope="module")
def scaled_head_model(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny target with a custom logit transform in its own (remote) modeling code."""
    folder = tmp_path_factory.mktemp("scaled") / "model"
    shutil.copytree(assets / "target", folder)
    (folder / "modeling_scaled.py").write_text(MODELING_SCALED)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_scaled.ScaledHeadLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_custom_head_transform_is_detected_and_scored_through_the_full_forward(
    scaled_head_model: Path, unequal_data: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(scaled_head_model, trust_remote_code=True).eval()
    assert type(model).__name__ == "ScaledHeadLlamaForCausalLM"
    scorer = ResponseScorer(model, chunk_tokens=CHUNK)
    why = check_head(scorer, torch.device("cpu"), atol=1e-4)
    assert why and "full forward" in why and scorer.full_forward
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(scaled_head_model), MAX_LENGTH)
    with torch.no_grad():
        for row in load_rows([str(unequal_data)])[:3]:
            s, _ = chat(row.messages)
            ids, mask = torch.tensor([s.input_ids]), torch.tensor([s.response_mask])
            logp_sum, n = scorer(ids, mask, torch.zeros_like(ids), 1, torch.ones_like(ids))
            torch.testing.assert_close(
                logp_sum / n, plain_scores(model, ids, torch.ones_like(ids), mask), atol=1e-5, rtol=0
            )
    # A plain model keeps the direct, chunked path.
    plain = ResponseScorer(AutoModelForCausalLM.from_pretrained(scaled_head_model).eval(), chunk_tokens=CHUNK)
    assert check_head(plain, torch.device("cpu"), atol=1e-4) is None and not plain.full_forward


def test_sft_step_on_two_trainers_equals_plain_pytorch_with_the_full_forward_fallback(
    assets: Path, scaled_head_model: Path, unequal_data: Path, tmp_path: Path
) -> None:
    """SFT's loss is the token mean over the whole global batch, not a mean of micro-batch means.

    The data has a 9th row that the template refuses (two user turns in a row): it is reported by
    file:line and the job trains on the others (data.max_bad_fraction allows it).
    """
    data = tmp_path / "with_refused_row.jsonl"
    refused = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    data.write_text(unequal_data.read_text() + json.dumps(refused) + "\n")
    spec = base_spec(
        assets,
        tmp_path / "run",
        model={
            "path": str(scaled_head_model),
            "max_length": MAX_LENGTH,
            "head_chunk_tokens": CHUNK,
            "trust_remote_code": True,
            "chat_template": ALTERNATING_CHATML,
        },
        aligned_models=[],
        objective={"kind": "sft"},
        data={"train_files": [str(data)], "max_bad_fraction": 0.2},
        training=dict(STEP),
        topology={"procs_per_node": 2},
    )
    proc_out = tmp_path / "out.txt"
    run_dir = run_job(spec, tmp_path, log=proc_out)
    assert "scores through the full forward" in proc_out.read_text()
    assert "1 of 9 rows unusable" in proc_out.read_text()
    report = json.loads((run_dir / "data_report" / "trainer.json").read_text())
    assert report["unusable_here"] == {"chat template refused the row: Conversation roles must alternate": 1}
    assert report["examples"]["chat template refused the row: Conversation roles must alternate"] == [f"{data}:9"]
    assert_partitioned(run_dir, "trainer", 2)

    def sft(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return -logp.sum() / tokens.sum()

    weights, grad_norm = plain_step(scaled_head_model, unequal_data, sft, trust_remote_code=True)
    assert_weights_equal(run_dir / "final_model", weights)
    (m,) = read_metrics(run_dir)
    assert m["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert m["loss"] == pytest.approx(m["cross_entropy"], rel=1e-6)  # the global token mean, exactly
