"""Sparse decode methods: one module per method, each a readable PyTorch reference.

Every method module exposes ``prepare(q, k, v, phase) -> DecodeState`` (see :mod:`.state`), registered in
:data:`attention_backends.api.REFERENCE_DECODE`; ``phase.params`` holds every parameter, defaults resolved.
"""
