"""Micro-batches: samples collated into the tensors a forward pass takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from poft_ds.data.chat import TokenizedSample


@dataclass
class Batch:
    """A right-padded batch of samples."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples: list[TokenizedSample], pad_id: int) -> Batch:
    """Right-pad samples into one batch (right padding keeps causal positions unchanged)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    resp = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        resp[i, :n] = torch.tensor(s.response_mask)
    return Batch(ids, attn, resp)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A token id for padding (padding is masked, so any valid id works when none is defined)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
