"""Benchmarks, run as `poft-ds bench ...`; each writes JSON and reports ratios measured in one run.

One module per benchmark: `padding` (real / processed tokens of the batchings), `scoring`
(poft-ds's scorer against padding to max length with float32 logits), `data` (tokenized data at
scale: cache size, memory per rank, tokenization rate) and `job` (`poft-ds bench job.yaml`: the
user's job as SFT, as PoFT with reference ranks and as PoFT from the score store).
"""
