"""The inference engine: config, weights (mmap views), kernels glue, forward pass, KV cache."""
