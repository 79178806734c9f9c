"""Response scores and their gradients against a plain full-logits computation."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft_ds.data.batch import collate, pack, pad_token_id
from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import load_rows
from poft_ds.scoring import ResponseScorer


def plain_scores(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """Forward, log-softmax over the whole vocabulary, gather, mask, mean."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    m = response_mask[:, 1:].float()
    return (logp * m).sum(1) / m.sum(1)


def _samples(assets: Path, name: str, n: int = 6):
    tok = AutoTokenizer.from_pretrained(assets / name)
    chat = ChatTokenizer(tok, max_length=96)
    rows = load_rows([str(assets / "data" / "train.jsonl")])[:n]
    return [chat(r.messages)[0] for r in rows], rows, tok


def _batch(assets: Path, name: str, n: int = 6):
    samples, rows, tok = _samples(assets, name, n)
    return collate(samples, pad_token_id(tok)), rows


def test_scores_match_plain_computation_for_both_tokenizers(assets: Path) -> None:
    for name in ("aligned_chatml", "aligned_zephyr"):
        model = AutoModelForCausalLM.from_pretrained(assets / name).eval()
        batch, rows = _batch(assets, name)
        assert any(sum(m["role"] == "assistant" for m in r.messages) > 1 for r in rows), "want a multi-turn sample"
        with torch.no_grad():
            expected = plain_scores(model, batch.input_ids, batch.attention_mask, batch.response_mask)
            for chunk in (2048, 5):  # one chunk, and many chunks of the output head
                logp_sum, n = ResponseScorer(model, chunk_tokens=chunk)(*batch.inputs())
                torch.testing.assert_close(logp_sum / n, expected, rtol=0, atol=1e-5)
                assert n.tolist() == batch.response_mask[:, 1:].sum(1).tolist()


def test_gradients_match_plain_computation_with_chunked_checkpointed_head(assets: Path) -> None:
    batch, _ = _batch(assets, "target", n=4)
    model = AutoModelForCausalLM.from_pretrained(assets / "target")
    weights = torch.tensor([0.3, 1.0, -0.7, 2.0])

    plain = (plain_scores(model, batch.input_ids, batch.attention_mask, batch.response_mask) * weights).sum()
    plain.backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    logp_sum, n = ResponseScorer(model, chunk_tokens=7)(*batch.inputs())
    ((logp_sum / n) * weights).sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-4, atol=1e-6, msg=k)


def test_right_padding_does_not_change_a_sample_score(assets: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(assets / "target").eval()
    batch, _ = _batch(assets, "target", n=6)
    scorer = ResponseScorer(model)
    with torch.no_grad():
        together = scorer(*batch.inputs())
        for i in range(6):
            width = int(batch.attention_mask[i].sum())
            ids = batch.input_ids[i : i + 1, :width]
            alone = scorer(ids, batch.response_mask[i : i + 1, :width], torch.zeros_like(ids), 1, torch.ones_like(ids))
            torch.testing.assert_close(together[0][i] / together[1][i], alone[0][0] / alone[1][0], rtol=0, atol=1e-5)


def test_packed_scores_and_gradients_equal_padded_ones(assets: Path) -> None:
    """One padding-free row of several multi-turn samples scores (and trains) each sample as alone.

    Attention is confined to each sample by the restarting position ids alone (no mask is passed),
    under both CPU attention implementations transformers offers.
    """
    for attn in ("sdpa", "eager"):
        for name in ("target", "aligned_zephyr"):
            samples, rows, tok = _samples(assets, name, n=8)
            assert any(sum(m["role"] == "assistant" for m in r.messages) > 1 for r in rows), "want multi-turn"
            model = AutoModelForCausalLM.from_pretrained(assets / name, attn_implementation=attn)
            padded, packed = collate(samples, pad_token_id(tok)), pack(samples)
            assert packed.input_ids.shape == (1, sum(len(s.input_ids) for s in samples))
            assert packed.attention_mask is None and packed.processed_tokens == padded.real_tokens
            weights = torch.linspace(-1.0, 2.0, len(samples))
            grads = []
            for batch in (padded, packed):
                model.zero_grad()
                logp_sum, n = ResponseScorer(model, chunk_tokens=5)(*batch.inputs())
                ((logp_sum / n) * weights).sum().backward()
                grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
                if batch is padded:
                    expected, expected_n = logp_sum.detach(), n
            torch.testing.assert_close(logp_sum.detach() / n, expected / expected_n, rtol=0, atol=1e-5)
            assert n.tolist() == expected_n.tolist()
            for k in grads[0]:
                torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=f"{attn} {name} {k}")
