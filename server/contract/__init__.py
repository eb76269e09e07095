"""The contract between the engines and the rest of the server.

Both engines (:mod:`server.engine`, the native one, and :mod:`server.vllm_engine`) implement
:class:`~server.contract.engine.Engine` and report each request's :class:`~server.contract.cost.RequestCost`;
the HTTP layer (:mod:`server.api`) and the metrics use only what is here, never an engine's internals. The
settings every engine takes are :class:`server.settings.EngineSettings`.
"""
