"""`qwenmlx serve`: an OpenAI-compatible local server over the same generation the CLI uses.

app.py (HTTP: routes, auth, errors, streaming) -> openai.py (shapes <-> one internal request and its
events) -> engine.py (the one generation thread, queue, cancel) -> prompt_cache.py and reply.py.
"""

from .app import create_app
from .engine import Engine, LoadedModel

__all__ = ["Engine", "LoadedModel", "create_app"]
