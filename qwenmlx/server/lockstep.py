"""`serve` under mlx.launch: every rank runs the engine, in lockstep; rank 0 alone has the HTTP side.

The ranks' model calls must match one for one (the same shapes, the same cache operations), or they wait
for each other forever. What decides them is the engine's input: which jobs start, which are cancelled,
when to stop. Time decides that on rank 0 (when a request arrives, when a client goes away), so before
each step rank 0 hands the others what changed (`share`), and everything else follows from it alike on
every rank: the batch, the prefill chunks, the prompt cache, each sequence's end. A job travels as its
rendered prompt and the settings that decide its model calls and its end (sampling, max tokens, stops,
logprobs, thinking budget); the tokens themselves come from rank 0 (Split.rank_0_samples). It goes by
distributed.broadcast_text, as chat's SharedInput does: one all_sum of a header per step when nothing
changed, a second with the news when something did.
"""

import dataclasses
import json
import signal
from collections.abc import Callable

from ..distributed import Ranks, broadcast_text, rest_until_next_tick
from ..errors import QwenMLXError
from ..generate import Sampling
from .engine import Changes, Engine, Job
from .request import Request


class Lockstep:
    """Rank 0's engine changes, handed to every rank before each step.

    An idle rank 0 waits for a request a tick at a time and says so: MLX's ring backend polls while a
    collective waits, so the others sleep between ticks rather than keep a core busy for as long as no one asks.
    """

    BUSY, IDLE = 0, 1

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def share(self, changes: Callable[[], Changes]) -> Changes:
        """Rank 0: changes(), sent to the others; the others: what rank 0 sent (their changes() is never called)."""
        if self.ranks.rank == 0:
            mine = changes()
            broadcast_text(self.IDLE if mine.idle else self.BUSY, encode(mine), self.ranks.group)
            return mine
        event, text = broadcast_text(self.BUSY, "", self.ranks.group)
        if event == self.IDLE:
            rest_until_next_tick()
        return decode(text)


def encode(changes: Changes) -> str:
    """The changes as JSON; "" when there are none (the usual step: only the header goes over the wire)."""
    if not (changes.jobs or changes.cancelled or changes.stop):
        return ""
    jobs = [{"request": dataclasses.asdict(dataclasses.replace(job.request, messages=None, prompt=None)),
             "prompt": job.prompt, "chat": job.chat, "sampling": dataclasses.asdict(job.sampling),
             "max_tokens": job.max_tokens} for job in changes.jobs]
    return json.dumps({"jobs": jobs, "cancelled": changes.cancelled, "stop": changes.stop})


def decode(text: str) -> Changes:
    """A follower's copy of rank 0's changes: its jobs send their events nowhere (rank 0 answers)."""
    if not text:
        return Changes()
    sent = json.loads(text)
    jobs = [Job(Request(**job["request"]), job["prompt"], job["chat"], Sampling(**job["sampling"]), job["max_tokens"],
                loop=None) for job in sent["jobs"]]
    return Changes(jobs, sent["cancelled"], sent["stop"])


STOP_SECONDS = 30.0  # how long a stopping rank 0 waits for answers under way, then for the step under way


def lead(engine: Engine, serve: Callable[[], None]) -> None:
    """Rank 0: serve HTTP until stopped (Ctrl-C, SIGTERM, or the engine failing), then stop the engine on every
    rank before this process ends. SIGTERM unwinds like Ctrl-C (uvicorn raises it again once it has stopped).

    The wait is bounded: when a rank dies in the middle of a collective, MLX's ring backend may leave this
    rank's side of it waiting forever, and mlx.launch, having stopped this rank once, waits for it to end.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not join's immediate exit: the others must be told
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve()
    except KeyboardInterrupt:  # the server was told to stop: not an error
        pass
    finally:
        engine.stop()
        if not engine.join(STOP_SECONDS):
            raise QwenMLXError(f"rank 0: the other ranks did not finish the step under way within {STOP_SECONDS:.0f} "
                               "s (is one of them lost?); stopping without them")


def follow(engine: Engine) -> None:
    """Every other rank: run rank 0's jobs until rank 0 stops them. Ctrl-C reaches every rank of a terminal's
    group, and is rank 0's to handle: the others wait for its word, so all stop after the same step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine.start()
    engine.join()
