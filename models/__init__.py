"""Language models assembled from kuramoto_attn: a GPT-2-style PhaseGPT and a TPI language model."""
