"""Micro-batches: samples laid out as the tensors of one forward pass.

Two layouts, one `Batch` type:

* padded (`collate`): one sample per row, right-padded, with an attention mask;
* packed (`pack`): every sample concatenated into one row, with no padding at all. Position ids
  restart at 0 at each sample, and no attention mask is passed: transformers then confines
  attention to each sample (the varlen kernel under `flash_attention_2`, a block-diagonal mask
  under `sdpa` and `eager`), so a packed sample sees exactly what it would see alone.

`sample_index` says which sample of the batch each token belongs to, so a forward pass returns
per-sample sums in either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from poft_ds.data.chat import TokenizedSample


@dataclass
class Batch:
    """The inputs of one forward pass.

    Attributes:
        input_ids: [rows, seq] token ids.
        response_mask: [rows, seq] bool, True where a token is scored (never a sample's first).
        sample_index: [rows, seq] which sample of the batch each token belongs to (0 on padding).
        n_samples: Samples in the batch (the length of per-sample outputs).
        attention_mask: [rows, seq] 1 on real tokens (padded layout), or None (packed layout).
        position_ids: [rows, seq] positions restarting at each sample (packed layout), or None.
    """

    input_ids: torch.Tensor
    response_mask: torch.Tensor
    sample_index: torch.Tensor
    n_samples: int
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids),
            move(self.response_mask),
            move(self.sample_index),
            self.n_samples,
            move(self.attention_mask),
            move(self.position_ids),
        )

    @property
    def real_tokens(self) -> int:
        """Tokens of the samples themselves (no padding)."""
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    @property
    def processed_tokens(self) -> int:
        """Tokens the forward pass runs over, padding included."""
        return self.input_ids.numel()

    def inputs(self) -> tuple:
        """The positional arguments of `ResponseScorer.forward`."""
        return (
            self.input_ids,
            self.response_mask,
            self.sample_index,
            self.n_samples,
            self.attention_mask,
            self.position_ids,
        )


def collate(samples: list[TokenizedSample], pad_id: int) -> Batch:
    """Right-pad samples into one batch, one per row (right padding keeps causal positions)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    resp = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.as_tensor(s.input_ids)
        attn[i, :n] = 1
        resp[i, :n] = torch.as_tensor(s.response_mask)
    resp[:, 0] = False  # the first token has no left context
    index = torch.arange(len(samples)).unsqueeze(1).expand(-1, width).contiguous()
    return Batch(ids, resp, index, len(samples), attention_mask=attn)


def pack(samples: list[TokenizedSample]) -> Batch:
    """Concatenate samples into one row with no padding; positions restart at each sample."""
    lengths = [len(s.input_ids) for s in samples]
    ids = torch.cat([torch.as_tensor(s.input_ids, dtype=torch.long) for s in samples]).unsqueeze(0)
    resp = torch.cat([torch.as_tensor(s.response_mask, dtype=torch.bool) for s in samples]).unsqueeze(0)
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    resp[0, starts] = False  # a sample's first token has no left context (the token before it is another sample's)
    index = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths)).unsqueeze(0)
    positions = torch.arange(ids.shape[1]) - torch.repeat_interleave(starts, torch.tensor(lengths))
    return Batch(ids, resp, index, len(samples), position_ids=positions.unsqueeze(0))


def empty_pass(sample: TokenizedSample) -> Batch:
    """A two-token batch that scores nothing, made from a real sample's first tokens.

    Ranks with no work left in a step run it so that ZeRO-3's collective parameter gathers stay in
    step with the busiest rank.
    """
    two = pack([TokenizedSample(sample.input_ids[:2], [False, False])])
    return Batch(two.input_ids, two.response_mask, torch.zeros_like(two.sample_index), 0, None, two.position_ids)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A token id for padding (padding is masked, so any valid id works when none is defined)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
