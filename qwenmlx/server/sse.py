"""Server-sent events, the frame every API's stream is made of."""

import json
from collections.abc import AsyncIterator, Callable


def sse(data: dict | str, event: str | None = None) -> str:
    """One frame: `event: NAME` when the API names its events (Anthropic, Responses), then `data: ...`."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


async def typed_stream(feed: Callable[[object], list[dict]], events: AsyncIterator) -> AsyncIterator[str]:
    """The frames of an API whose stream events name themselves by "type" (Anthropic's, Responses): each
    engine event fed to the API's translator, each event it gives back framed under its own type."""
    async for event in events:
        for frame in feed(event):
            yield sse(frame, frame["type"])
