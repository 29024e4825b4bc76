"""The worker: runs a step plan on the device (model runner, sampler, CUDA graphs, KV cache)."""
