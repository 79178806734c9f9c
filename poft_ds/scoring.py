"""Response log-probabilities: the score both trainers and reference ranks compute.

`s_m(x, y) = (1/|y|) * sum_t log p_m(y_t | x, y_<t)` over the response (assistant) tokens.

The [batch, sequence, vocabulary] logits are never built: the decoder's hidden states at the
response positions are gathered first, and the output head runs on chunks of them, each turned
into float32 log-probabilities and reduced at once. During training each chunk is recomputed in
the backward pass (activation checkpointing), so no float32 logits outlive their chunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _chunk_token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def _head_needs_full_forward(lm: nn.Module) -> bool:
    # Some architectures post-process logits (Gemma's soft-capping, Cohere's scaling); calling the
    # output head directly would miss that, so those take the model's own forward instead.
    cfg = lm.config
    return bool(getattr(cfg, "final_logit_softcapping", None)) or getattr(cfg, "logit_scale", None) not in (None, 1.0)


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
        self.chunk_tokens = chunk_tokens
        self.full_forward = _head_needs_full_forward(lm)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a right-padded batch.

        Args:
            input_ids: [batch, seq] token ids.
            attention_mask: [batch, seq], 1 for real tokens.
            response_mask: [batch, seq] bool, True where the token is a response token to score.

        Returns:
            (logp_sum, n_tokens): [batch] float32 sums of response-token log-probabilities and
            [batch] counts of response tokens.
        """
        # Position t's hidden state predicts token t + 1.
        predict = response_mask[:, 1:]
        targets = input_ids[:, 1:][predict]
        sample_of = torch.nonzero(predict, as_tuple=True)[0]
        if self.full_forward:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][predict]
            token_logps = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            hidden = hidden[:, :-1][predict]
            head = self.lm.get_output_embeddings()
            parts = []
            for start in range(0, max(hidden.shape[0], 1), self.chunk_tokens):
                h, y = hidden[start : start + self.chunk_tokens], targets[start : start + self.chunk_tokens]
                if torch.is_grad_enabled() and h.requires_grad:
                    parts.append(checkpoint(_chunk_token_logps, head, h, y, use_reentrant=False))
                else:
                    parts.append(_chunk_token_logps(head, h, y))
            token_logps = torch.cat(parts)
        logp_sum = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        logp_sum = logp_sum.index_add(0, sample_of, token_logps)
        return logp_sum, predict.sum(dim=1)
