"""The HTTP API: ``create_app(engine, settings)`` builds the FastAPI app for any engine."""

from .app import create_app

__all__ = ["create_app"]
