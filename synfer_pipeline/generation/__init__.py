"""The generator: two-stage diffusion fine-tuning, the AU adapter, training workspaces, and (step 6) the sampler with
AU injection and semantic guidance."""
