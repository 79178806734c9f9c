"""The data path, from file to micro-batch, one module per stage:

1. `rows`: read the data files (JSONL, JSON, CSV/TSV, Parquet, Arrow; messages, ShareGPT, Alpaca,
   prompt/response) into conversations, with every bad row named by file and line;
2. `chat`: render a conversation under one model's chat template and mask its response tokens;
3. `tokenize`: tokenize every row under one model, cached by content;
4. `prepare`: agree with every other rank on the usable samples and derive the `schedule`;
5. `schedule`: which sample each rank takes at each step, derived alike on every rank;
6. `batch`: samples collated into the tensors of one forward pass.
"""
