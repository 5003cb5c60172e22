"""``twotower serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the one decoding
entry point. ``protocol`` holds the request schemas and their settings, ``engine`` the worker
that owns the model and batches requests, ``app`` the endpoints, ``metrics`` the Prometheus
metrics, ``page.html`` the live view."""

from .app import create_app
from .engine import Engine

__all__ = ["Engine", "create_app"]
