"""Loading Hugging Face models into DeepSpeed ZeRO-3 engines."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from poft_ds.scoring import ResponseScorer
from poft_ds.spec import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_scorer(model: ModelSpec, ds_config: dict[str, Any], precision: str) -> ResponseScorer:
    """Load a causal LM partitioned by ZeRO-3 from the start and wrap it for scoring.

    While an `HfDeepSpeedConfig` with stage 3 is alive, `from_pretrained` builds the model inside
    `deepspeed.zero.Init`, so no rank ever holds the whole model.
    """
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive through from_pretrained)
    lm = AutoModelForCausalLM.from_pretrained(
        model.path,
        dtype=DTYPES[precision],
        trust_remote_code=model.trust_remote_code,
        use_safetensors=None,
    )
    return ResponseScorer(lm)


def inference_engine(scorer: ResponseScorer, ds_config: dict[str, Any]) -> deepspeed.DeepSpeedEngine:
    """A ZeRO-3 inference engine: parameters sharded over the role world, no optimizer, eval mode."""
    for p in scorer.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=scorer, config=ds_config)
    engine.eval()
    return engine
