"""Response log-probabilities: the score both trainers and reference ranks compute.

`s_m(x, y) = (1/|y|) * sum_t log p_m(y_t | x, y_<t)` over the response (assistant) tokens.

The [batch, sequence, vocabulary] logits are never built: the decoder's hidden states at the
response positions are gathered first, and the output head's weight multiplies chunks of them,
each turned into float32 log-probabilities and reduced at once. During training each chunk is
recomputed in the backward pass (activation checkpointing), so no float32 logits outlive their
chunk.

Under ZeRO-3 every module call gathers that module's partitioned parameters collectively, so the
ranks of one role must make the same module calls in the same order whatever their data. The
chunk loop therefore runs inside *one* call of `ResponseLogProbs`, which borrows the head's
weight as a ZeRO-3 external parameter: one gather per forward (and one per backward) however many
chunks a rank's samples need, so ranks with long and short responses stay in step.

Some models post-process logits after the head (Gemma-2's soft-capping, Cohere's and Granite's
scaling, or any custom subclass). `ResponseScorer.check_head` compares the direct path with the
model's own forward on a probe batch at load time and falls back to the full forward when they
differ, so no head transform is silently skipped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


class ResponseLogProbs(nn.Module):
    """log p(target) at given hidden states, through a linear output head, in chunks.

    The head is kept by reference, not as a submodule (its parameters stay registered once, under
    the language model). Under ZeRO-3 its weight is registered as an external parameter of this
    module, so DeepSpeed gathers it when this module runs, not once per chunk.

    Args:
        head: The model's output embedding (a linear layer).
        chunk_tokens: Positions per chunk (bounds float32 logits at chunk x vocabulary).
    """

    def __init__(self, head: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # a reference, not a submodule
        self.chunk_tokens = chunk_tokens
        for p in head.parameters(recurse=False):
            if hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter
                import deepspeed

                deepspeed.zero.register_external_parameter(self, p)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[n, hidden] states and [n] target ids -> [n] float32 log-probabilities."""
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        parts = []
        # An empty input still makes one (empty) chunk so that backward reaches this module.
        for start in range(0, max(hidden.shape[0], 1), self.chunk_tokens):
            h, y = hidden[start : start + self.chunk_tokens], targets[start : start + self.chunk_tokens]
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                parts.append(checkpoint(_chunk_token_logps, h, y, weight, bias, use_reentrant=False))
            else:
                parts.append(_chunk_token_logps(h, y, weight, bias))
        return torch.cat(parts)


class ResponseScorer(nn.Module):
    """Wraps a causal LM so that its forward returns per-sample response log-probability sums.

    DeepSpeed engines wrap this module, so training and ZeRO-3 inference both go through it.

    Args:
        lm: A Hugging Face causal language model.
        chunk_tokens: Response positions per output-head chunk (bounds float32 logits memory).
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = 2048) -> None:
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        # Only a plain linear head can be applied by hand; anything else takes the model's forward.
        self.full_forward = not isinstance(head, nn.Linear)
        self.head_logps = ResponseLogProbs(head, chunk_tokens) if isinstance(head, nn.Linear) else None

    def forward(
        self,
        input_ids: torch.Tensor,
        response_mask: torch.Tensor,
        sample_index: torch.Tensor,
        n_samples: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        full_forward: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch, padded or packed (`poft_ds.data.batch`).

        Args:
            input_ids: [rows, seq] token ids.
            response_mask: [rows, seq] bool, True where the token is a response token to score.
            sample_index: [rows, seq] the sample each token belongs to.
            n_samples: Samples in the batch.
            attention_mask: [rows, seq], 1 for real tokens (padded rows), or None (packed rows:
                the model confines attention to each sample by its restarting `position_ids`).
            position_ids: [rows, seq] positions restarting at each packed sample, or None.
            full_forward: Force (True) or forbid (False) the model's own forward; None: as
                `check_head` decided.

        Returns:
            (logp_sum, n_tokens): [n_samples] float32 sums of response-token log-probabilities and
            [n_samples] counts of response tokens.
        """
        # Position t's hidden state predicts token t + 1.
        predict = response_mask[:, 1:]
        targets = input_ids[:, 1:][predict]
        owner = sample_index[:, 1:][predict]
        # No KV cache: transformers confines attention to each packed sample (from the restarting
        # position ids) only when there is neither an attention mask nor a cache.
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        if self.full_forward if full_forward is None else full_forward:
            logits = self.lm(**inputs).logits[:, :-1][predict]
            token_logps = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            hidden = self.lm.get_decoder()(**inputs).last_hidden_state
            token_logps = self.head_logps(hidden[:, :-1][predict], targets)
        logp_sum = torch.zeros(n_samples, dtype=torch.float32, device=input_ids.device).index_add(0, owner, token_logps)
        n_tokens = torch.zeros(n_samples, dtype=torch.long, device=input_ids.device).index_add(
            0, owner, torch.ones_like(owner)
        )
        return logp_sum, n_tokens


def check_head(scorer: nn.Module, device: torch.device, atol: float) -> str | None:
    """Decide, on a probe batch, whether scoring may apply the output head directly.

    Runs the probe through the direct path and through the model's own forward. Every rank of a
    role must call this together (under ZeRO-3 both passes gather parameters collectively); they
    see the same probe and the same weights, so they reach the same decision.

    Args:
        scorer: The `ResponseScorer`, or a DeepSpeed engine wrapping one.
        device: Where the probe goes.
        atol: Largest tolerated difference of mean log-probabilities (precision-dependent).

    Returns:
        None when the direct path is used, else why the full forward is used from now on.
    """
    module = getattr(scorer, "module", scorer)
    if module.full_forward:
        return "its output head is not a plain linear layer"
    weight = module.lm.get_output_embeddings().weight
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the full shape in ds_shape
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (2, 24), generator=g).to(device)
    resp = torch.ones_like(ids, dtype=torch.bool)
    index = torch.arange(2, device=device).unsqueeze(1).expand(-1, 24)
    with torch.no_grad():
        direct = scorer(ids, resp, index, 2, torch.ones_like(ids), None, False)
        full = scorer(ids, resp, index, 2, torch.ones_like(ids), None, True)
    diff = ((direct[0] - full[0]) / direct[1]).abs().max().item()
    if diff <= atol:
        return None
    module.full_forward = True
    return (
        f"the model's own forward changes the output head's logits (mean log-probability differs by {diff:.3g} "
        "on a probe batch: soft-capping, scaling or a custom head), so poft-ds scores through the full forward "
        "(full-vocabulary logits; more memory)"
    )
