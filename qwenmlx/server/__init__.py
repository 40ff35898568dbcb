"""`qwenmlx serve`: a local server (OpenAI's and Anthropic's APIs) over the same generation the CLI uses.

app.py (HTTP: routes, auth, errors, streaming) -> openai.py, anthropic.py, responses.py (each API's
shapes <-> request.py's one internal request and its events) -> engine.py (the one generation thread,
queue, cancel) -> prompt_cache.py and reply.py.
"""

from .app import create_app
from .engine import Engine, LoadedModel

__all__ = ["Engine", "LoadedModel", "create_app"]
