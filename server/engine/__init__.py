"""The native engine: model runner, per-head paged KV cache, scheduler, sampler."""
