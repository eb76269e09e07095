"""Sparse prefill methods: one module per method, each a readable PyTorch reference.

Every method module exposes ``prefill(q, k, v, phase) -> PrefillOutcome`` (see :mod:`.common`), registered
in :data:`attention_backends.api.REFERENCE_PREFILL`; ``phase.params`` holds every parameter, defaults resolved.
"""
