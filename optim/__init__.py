"""Training algorithms and what they train: the GPT model, the data, DiLoCo, synchronous data parallelism and 1-bit Adam."""
