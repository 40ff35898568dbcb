"""The server's parts without HTTP: the reply parser, the prompt cache, SSE keep-alives, the engine."""

import asyncio
import json
import logging
import time
from types import SimpleNamespace

import mlx.core as mx
import pytest

from qwenmlx.cache import KVCache, RotatingKVCache, copy_caches
from qwenmlx.checkpoint import load
from qwenmlx.generate import stream_generate
from qwenmlx.server.app import with_keepalives
from qwenmlx.server.engine import Engine, LoadedModel, Request, greedy_tokens, scripted_sampler, thinking_switch
from qwenmlx.server.prompt_cache import DiskCache, PromptCache
from qwenmlx.server.reply import Reply, Text, ToolCall
from qwenmlx.server.request import Finished, Started

# --- the reply: reasoning, content, tool calls, stop strings ---

THINK, END_THINK, WORD = 1, 2, 0
TOKENIZER = SimpleNamespace(think_start_id=THINK, think_end_id=END_THINK)


def run(reply: Reply, pieces: list[tuple[int, str]]) -> list:
    out = []
    for token, text in pieces:
        out += reply.feed(token, text)
        if reply.stopped:
            break
    return out + reply.finish()


def text_of(events: list, kind: str) -> str:
    return "".join(e.text for e in events if isinstance(e, Text) and e.kind == kind)


def characters(text: str) -> list[tuple[int, str]]:
    """The text as one-character tokens: every marker and stop string is split across tokens."""
    return [(WORD, c) for c in text]


def test_a_stop_string_split_over_tokens_is_never_sent_and_the_text_before_it_is():
    reply = Reply(TOKENIZER, [WORD], stop=["gamma", "zeta"])
    events = run(reply, [(WORD, "al"), (WORD, "pha ga"), (WORD, "m"), (WORD, "ma delta")])
    assert reply.stopped and text_of(events, "content") == "alpha"
    assert all("g" not in e.text for e in events)


def test_text_that_only_began_like_a_stop_string_is_sent_once_it_cannot_be_one():
    reply = Reply(TOKENIZER, [WORD], stop=["gamma"])
    assert reply.feed(WORD, "a ga") == [Text("content", "a")]  # "ga" might begin "gamma"; the space waits too
    events = reply.feed(WORD, "rden") + reply.finish()
    assert not reply.stopped and text_of(events, "content") == " garden"


def test_thinking_between_markers_is_reasoning_with_blank_edges_dropped():
    events = run(Reply(TOKENIZER, [WORD]), [(THINK, "<think>"), (WORD, "\nFirst.\n\nSecond."), (WORD, "\n"),
                                            (END_THINK, "</think>"), (WORD, "\n\n"), (WORD, "Answer.")])
    assert text_of(events, "reasoning") == "First.\n\nSecond."
    assert text_of(events, "content") == "Answer."


def test_a_thought_the_prompt_opened_is_reasoning_until_it_closes():
    events = run(Reply(TOKENIZER, [WORD, THINK, WORD]),
                 [(WORD, "I think."), (END_THINK, "</think>"), (WORD, "\n\nDone.")])
    assert text_of(events, "reasoning") == "I think." and text_of(events, "content") == "Done."


def test_stop_strings_do_not_apply_to_the_reasoning():
    events = run(Reply(TOKENIZER, [WORD], stop=["x"]),
                 [(THINK, "<think>"), (WORD, "x marks"), (END_THINK, "</think>"), (WORD, "ab x cd")])
    assert text_of(events, "reasoning") == "x marks" and text_of(events, "content") == "ab"


def test_tool_calls_split_over_tokens_become_tool_calls_in_order():
    output = ('Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
              '<tool_call>\n{"name": "g", "arguments": "{}"}\n</tool_call>')
    reply = Reply(TOKENIZER, [WORD], tools=True)
    events = run(reply, characters(output))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "f", {"x": 1}), (1, "g", {})]
    assert len({c.id for c in calls}) == 2 and reply.n_tool_calls == 2
    assert text_of(events, "content") == "Let me look."


@pytest.mark.parametrize("output", [
    '<tool_call>\n{"name": "f", "arguments": \n</tool_call>',  # not JSON
    '<tool_call>\n["f"]\n</tool_call>',  # JSON, but not a call
    '<tool_call>\n{"name": "f", "arguments": {}}',  # never closed
])
def test_a_malformed_tool_call_stays_content(output):
    reply = Reply(TOKENIZER, [WORD], tools=True)
    events = run(reply, characters(output))
    assert text_of(events, "content") == output and reply.n_tool_calls == 0


def test_a_raw_completion_keeps_every_character_as_content():
    text = "\n<think>a</think>\n <tool_call>{}</tool_call> "
    events = run(Reply(TOKENIZER, [WORD], chat=False), [(THINK, "\n<think>"), (WORD, "a"), (END_THINK, "</think>"),
                                                        (WORD, "\n <tool_call>{}</tool_call> ")])
    assert text_of(events, "content") == text


@pytest.mark.parametrize("texts, thinking", [
    (["Hello"], True),
    (["Hello /no_think"], False),
    (["/no_think please", "now /think"], True),
    (["/think", "no switch here"], True),
    (["/think then /no_think"], False),
])
def test_the_last_soft_switch_in_the_conversation_decides_thinking(texts, thinking):
    messages = [{"role": "user", "content": t} for t in texts]
    assert thinking_switch(messages) is thinking


# --- the prompt cache ---


def caches_holding(tokens: list[int], cache: KVCache | None = None) -> list[KVCache]:
    """A one-layer cache whose keys are the token ids themselves, so what it holds can be read back."""
    cache = cache or KVCache()
    x = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1)
    cache.store(x, x)
    return [cache]


def read(caches: list[KVCache]) -> list[int]:
    return [int(t) for t in caches[0].state[0].reshape(-1).tolist()]


def test_a_request_starts_from_the_entry_sharing_the_longest_prefix_trimmed_to_it_and_the_entry_stays():
    store = PromptCache(1 << 30)
    store.store("m", [1, 2, 3, 4, 5], caches_holding([1, 2, 3, 4, 5]), prompt=[1, 2, 3])
    store.store("m", [1, 2, 9, 9], caches_holding([1, 2, 9, 9]), prompt=[1, 2, 9])
    reuse = store.fetch("m", [1, 2, 3, 4, 7, 8])
    assert reuse.reused == 4 and read(reuse.caches) == [1, 2, 3, 4]
    caches_holding([7, 8], reuse.caches[0])  # the request writes on
    again = store.fetch("m", [1, 2, 3, 4, 5, 6])
    assert again.reused == 5 and read(again.caches) == [1, 2, 3, 4, 5]


def test_one_prompt_token_is_always_left_to_feed():
    store = PromptCache(1 << 30)
    store.store("m", [1, 2, 3, 4], caches_holding([1, 2, 3, 4]), prompt=[1, 2])
    assert store.fetch("m", [1, 2, 3, 4]).reused == 3


def test_caches_never_cross_namespaces():
    store = PromptCache(1 << 30)
    store.store("model-a|kv_bits=None", [1, 2, 3], caches_holding([1, 2, 3]), prompt=[1, 2])
    reuse = store.fetch("model-a|kv_bits=8", [1, 2, 3, 4])
    assert reuse.caches is None and reuse.reused == 0


def test_the_least_recently_used_entries_go_first_once_past_the_byte_budget():
    one = caches_holding([1, 2, 3])[0].nbytes
    store = PromptCache(2 * one)
    for first in (10, 20, 30):
        store.store("m", [first, 2, 3], caches_holding([first, 2, 3]), prompt=[first, 2, 3])
        if first == 20:
            store.fetch("m", [10, 2, 3])  # 10 is now more recent than 20
    assert store.nbytes <= 2 * one
    assert store.fetch("m", [20, 2, 3]).reused == 0
    assert store.fetch("m", [10, 2, 3]).reused == 2 and store.fetch("m", [30, 2, 3]).reused == 2


def test_an_entry_the_new_one_extends_is_dropped_and_the_prompts_checkpoint_counts_no_memory():
    store = PromptCache(1 << 30)
    store.store("m", [1, 2, 3], caches_holding([1, 2, 3]), prompt=[1, 2])
    caches = caches_holding([1, 2, 3, 4, 5, 6])
    store.store("m", [1, 2, 3, 4, 5, 6], caches, prompt=[1, 2, 3, 4])
    assert sorted(e.tokens for e in store.entries.values()) == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]
    assert store.nbytes == caches[0].nbytes


def test_a_checkpoint_taken_before_a_rotating_cache_evicted_serves_the_next_turn_exactly():
    """Qwen3 re-renders the last answer without its thinking: the next prompt leaves the reply at its start."""

    def attend(cache: KVCache, tokens: list[int]) -> None:
        x = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1)
        cache.attend(x, x, x, 1.0, rope=lambda y, shift: y)

    prompt = [1, 2, 3, 4, 5, 6]
    cache = RotatingKVCache(max_size=8, keep=2)
    attend(cache, prompt)
    checkpoint = copy_caches([cache])
    reply = [50, 51, 52, 53]
    for token in reply:
        attend(cache, [token])
    assert cache.evicted  # the reply pushed part of the prompt out
    store = PromptCache(1 << 30)
    store.store("m", prompt + reply, [cache], prompt, checkpoint)
    reuse = store.fetch("m", prompt + [60, 61])
    assert reuse.reused == 6 and read(reuse.caches) == prompt and reuse.caches[0].evicted == 0


def test_no_budget_keeps_nothing():
    store = PromptCache(0)
    store.store("m", [1, 2, 3], caches_holding([1, 2, 3]), prompt=[1, 2])
    assert store.fetch("m", [1, 2, 3]).reused == 0


# --- the prompt cache on disk ---


def test_a_prompt_cache_on_disk_serves_a_new_process_the_prefix_an_old_one_stored(tmp_path):
    PromptCache(0, DiskCache(tmp_path, 1 << 30)).store("m", [1, 2, 3, 4, 5], caches_holding([1, 2, 3, 4, 5]),
                                                       prompt=[1, 2, 3, 4])
    restarted = PromptCache(1 << 30, DiskCache(tmp_path, 1 << 30))  # a new process: only the files remain
    reuse = restarted.fetch("m", [1, 2, 3, 4, 8, 9])
    assert reuse.reused == 4 and read(reuse.caches) == [1, 2, 3, 4]
    assert restarted.fetch("other-model", [1, 2, 3, 4, 8, 9]).reused == 0


def test_a_truncated_a_renamed_or_a_foreign_file_is_ignored_with_a_log_line_and_never_loaded(tmp_path, caplog):
    disk = DiskCache(tmp_path, 1 << 30)
    for first in (1, 2, 3):
        disk.store("m", [first, 7, 7, 7], caches_holding([first, 7, 7, 7]))
    truncated, renamed, other = (tmp_path / DiskCache.file_name("m", [n, 7, 7, 7]) for n in (1, 2, 3))
    truncated.write_bytes(truncated.read_bytes()[:-8])
    renamed.rename(tmp_path / DiskCache.file_name("m", [5, 7, 7, 7]))
    (tmp_path / "foreign.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}              ")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="qwenmlx.server"):
        store = PromptCache(1 << 30, DiskCache(tmp_path, 1 << 30))
        assert store.fetch("m", [1, 7, 7, 7, 8]).reused == 0
        assert store.fetch("m", [5, 7, 7, 7, 8]).reused == 0
        assert store.fetch("m", [3, 7, 7, 7, 8]).reused == 4  # the intact file still serves
    logged = caplog.text
    for path in (truncated, tmp_path / DiskCache.file_name("m", [5, 7, 7, 7]), tmp_path / "foreign.safetensors",
                 tmp_path / "garbage.safetensors"):
        assert f"ignoring {path}" in logged
    assert truncated.exists() and (tmp_path / "garbage.safetensors").exists()  # left alone, not deleted


def test_past_the_disk_budget_the_least_recently_used_files_go_and_only_the_caches_own(tmp_path):
    disk = DiskCache(tmp_path, 1 << 30)
    disk.store("m", [10, 2, 3], caches_holding([10, 2, 3]))
    size = next(iter(disk.entries.values())).nbytes
    (tmp_path / "notes.safetensors").write_bytes(b"someone else's file")
    disk = DiskCache(tmp_path, 2 * size + size // 2)  # room for two
    for first in (20, 30):
        time.sleep(0.01)  # distinct modification times
        disk.store("m", [first, 2, 3], caches_holding([first, 2, 3]))
    assert sorted(e.tokens[0] for e in disk.entries.values()) == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "notes.safetensors"
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_prompt_that_extends_one_on_disk_replaces_its_file(tmp_path):
    disk = DiskCache(tmp_path, 1 << 30)
    disk.store("m", [1, 2], caches_holding([1, 2]))
    disk.store("m", [1, 2, 3, 4], caches_holding([1, 2, 3, 4]))
    assert [e.tokens for e in disk.entries.values()] == [[1, 2, 3, 4]]
    assert [p.name for p in tmp_path.iterdir()] == [DiskCache.file_name("m", [1, 2, 3, 4])]


# --- SSE keep-alives ---


def test_keepalive_comments_flow_while_no_frame_is_ready_and_frames_follow():
    async def collect() -> list[str]:
        ready = asyncio.Event()

        async def frames():
            await ready.wait()  # like a long prefill: nothing until a keep-alive has gone out
            yield "data: 1\n\n"
            yield "data: [DONE]\n\n"

        out = []
        async for frame in with_keepalives(frames(), 0.01):
            out.append(frame)
            ready.set()
        return out

    out = asyncio.run(collect())
    assert out[0] == ": keep-alive\n\n" and out[-2:] == ["data: 1\n\n", "data: [DONE]\n\n"]


# --- the engine, without HTTP ---


async def drained(events) -> list:
    """Every event left in a stream, to its end."""
    return [event async for event in events]


def answer(engine: Engine, request: Request) -> tuple[list, list[int]]:
    """Every event of one request, and its prompt's tokens."""

    async def run() -> tuple[list, list[int]]:
        job = engine.prepare(request, asyncio.get_running_loop())
        engine.submit(job)
        return [event async for event in job.events()], job.prompt

    return asyncio.run(run())


@pytest.mark.parametrize("argmax_only", [[True] * 4, [False, True, False, True], [False] * 3])
def test_a_batchs_plain_greedy_rows_get_their_own_argmax_from_one_call_and_the_others_are_left_to_sample(argmax_only):
    class Row:  # a sequence, as far as the batch's sampling sees it
        def __init__(self, flag: bool):
            self.argmax_only = flag

    batch = [Row(flag) for flag in argmax_only]
    logits = mx.random.normal((len(batch), 1000), key=mx.random.key(0))
    tokens = greedy_tokens(batch, logits)
    assert list(tokens) == [s for s in batch if s.argmax_only]
    for i, sequence in enumerate(batch):
        if sequence.argmax_only:
            token, logprobs = tokens[sequence]
            assert token.shape == (1,) and token.item() == mx.argmax(logits[i]).item() and logprobs is None


def test_a_reply_that_evicts_from_a_rotating_cache_leaves_an_exact_checkpoint_for_the_next_turn(moe_dir):
    """The next turn re-renders the reply without its thinking, so it shares only the prompt with it."""
    engine = Engine(lambda: LoadedModel(*load(moe_dir), "tiny"), name="tiny", max_kv_size=48, allow_scripted=True)
    engine.start()
    try:
        while engine.state == "loading":
            time.sleep(0.01)
        messages = [{"role": "user", "content": "Count for me, please."}]
        reply = "<think>\n" + "one " * 50 + "\n</think>\n\nDone."
        events, prompt = answer(engine, Request(messages=messages, max_tokens=80, scripted={"reply": reply}))
        assert len(prompt) + events[-1].usage.completion_tokens > 48 + 10  # the reply evicted part of the prompt
        [checkpoint] = [e for e in engine.prompt_cache.entries.values() if e.tokens == prompt]
        assert checkpoint.caches[0].evicted == 0 and checkpoint.caches[0].offset == len(prompt)
        messages += [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "Thanks."}]
        events, _ = answer(engine, Request(messages=messages, max_tokens=2))
        assert events[-1].usage.cached_tokens == len(prompt)
    finally:
        engine.stop()


def test_past_the_thinking_budget_the_engine_closes_the_thought_as_the_clis_generation_does(moe_dir):
    """The same model, prompt, scripted sampler and budget through the engine and through stream_generate."""
    engine = Engine(lambda: LoadedModel(*load(moe_dir), "tiny"), name="tiny", allow_scripted=True)
    engine.start()
    try:
        while engine.state == "loading":
            time.sleep(0.01)
        messages = [{"role": "user", "content": "Think hard."}]
        reply = "<think>\n" + "one two three " * 20 + "\n</think>\n\nDone."
        events, prompt = answer(engine, Request(messages=messages, max_tokens=60, thinking_budget=8,
                                                scripted={"reply": reply}))
    finally:
        engine.stop()
    model, tokenizer = load(moe_dir)  # MLX streams belong to a thread: the engine's copy stays on its own
    script = tokenizer.encode(reply)
    steps = list(stream_generate(model, tokenizer, prompt, max_tokens=60, thinking_budget=8,
                                 sampler=scripted_sampler(script, min(tokenizer.eos_token_ids), None)))
    thought = "".join(s.text for s in steps if s.thinking)
    assert "Considering the limited time by the user" in text_of(events, "reasoning")
    assert text_of(events, "reasoning") == thought.replace("<think>", "").replace("</think>", "").strip()
    assert events[-1].usage.completion_tokens == len(steps)


def test_a_long_new_prompt_is_prefilled_a_chunk_per_step_while_the_running_stream_keeps_decoding(moe_dir):
    engine = Engine(lambda: LoadedModel(*load(moe_dir), "tiny"), name="tiny", allow_scripted=True, prefill_step=16)
    engine.start()
    sent = []  # (which request, event), in the order the generation thread sent them

    def recorded(job, name: str):
        send = job.send
        job.send = lambda event: (sent.append((name, event)), send(event))
        return job

    async def run() -> None:
        loop = asyncio.get_running_loop()
        running = recorded(engine.prepare(Request(messages=[{"role": "user", "content": "Go on."}], max_tokens=300,
                                                  scripted={"reply": "on " * 300}), loop), "running")
        engine.submit(running)
        events = running.events()
        event = await anext(events)
        while not isinstance(event, Text):  # until it is decoding
            event = await anext(events)
        long_prompt = [{"role": "user", "content": "word " * 400}]
        arriving = recorded(engine.prepare(Request(messages=long_prompt, max_tokens=2), loop), "arriving")
        engine.submit(arriving)
        async for event in arriving.events():
            if isinstance(event, Finished):
                break
        running.cancel()
        await drained(events)  # the cancelled stream, to its end

    try:
        while engine.state == "loading":
            time.sleep(0.01)
        asyncio.run(run())
    finally:
        engine.stop()
    names = [name for name, _ in sent]
    started = names.index("arriving")  # its Started: taken into the batch, its prefill begins
    first_token = next(i for i, (name, e) in enumerate(sent) if name == "arriving" and not isinstance(e, Started))
    assert names[started:first_token].count("running") >= 400 // 16 - 1  # a decode step after every chunk


@pytest.mark.parametrize("model_card, requested, thinks", [("Instruct-2507", True, False),
                                                          ("Thinking-2507", False, True)])
def test_a_2507_model_is_sampled_per_its_fixed_thinking_mode_whatever_the_request_asks(moe_dir, tmp_path, model_card,
                                                                                        requested, thinks):
    from qwenmlx.generate import default_sampling
    from tests.checkpoints import checkpoint_variant
    from tests.qwen_tokenizer_files import FIXTURES

    template = (FIXTURES / f"chat_template-Qwen3-30B-A3B-{model_card}.jinja").read_bytes()
    model_dir = checkpoint_variant(moe_dir, tmp_path / "model", {"chat_template.jinja": template})
    engine = Engine(lambda: LoadedModel(*load(model_dir), "tiny"), name="tiny")
    engine.start()
    try:
        while engine.state == "loading":
            time.sleep(0.01)
        job = engine.prepare(Request(messages=[{"role": "user", "content": "Hi"}], thinking=requested), None)
        assert job.sampling == default_sampling(thinks, engine.tokenizer.generation_config)
        assert job.sampling != default_sampling(requested, engine.tokenizer.generation_config)
    finally:
        engine.stop()


def test_a_self_extend_model_is_served_a_request_at_a_time_and_answers_as_the_clis_generation_does(moe_dir):
    """Its attention places positions from one sequence's length, which a batch of caches does not carry."""
    from qwenmlx.generate import GREEDY

    self_extend = {"group_size": 2, "window": 8}
    engine = Engine(lambda: LoadedModel(*load(moe_dir, self_extend=self_extend), "tiny"), name="tiny", max_batch=4)
    engine.start()
    try:
        while engine.state == "loading":
            time.sleep(0.01)
        events, prompt = answer(engine, Request(messages=[{"role": "user", "content": "Count past the window."}],
                                                thinking=False, max_tokens=12, sampling={"temperature": 0.0}))
    finally:
        engine.stop()
    assert engine.max_batch == 1
    model, tokenizer = load(moe_dir, self_extend=self_extend)
    steps = list(stream_generate(model, tokenizer, prompt, max_tokens=12, sampling=GREEDY))
    assert events[-1].usage.completion_tokens == len(steps)
    assert text_of(events, "content") == "".join(s.text for s in steps if not s.thinking).strip()


def test_a_raw_completion_prompt_is_read_with_its_special_tokens_as_the_template_writes_them(moe_dir):
    """/v1/completions' prompt is the model's whole input, formatted by the client: <|im_start|> there is a marker."""
    engine = Engine(lambda: LoadedModel(*load(moe_dir), "tiny"), name="tiny")
    engine.start()
    try:
        while engine.state == "loading":
            time.sleep(0.01)
        messages = [{"role": "user", "content": "Hello there"}]
        written = engine.tokenizer.apply_chat_template(messages, enable_thinking=False)
        prompt, thinking = engine.render(Request(prompt=written))
        assert prompt == engine.tokenizer.apply_chat_template(messages, enable_thinking=False, tokenize=True)
        assert not thinking
    finally:
        engine.stop()


def test_a_pipeline_ranks_share_of_the_prompt_cache_budget_keeps_the_entries_the_whole_model_keeps(moe_dir):
    """Under mlx.launch a pipeline rank holds its layers' caches alone (rank 0 of 2: 2 of the 3 layers). With its
    layers' share of the budget it keeps and drops the same entries as a whole model would, as every rank must."""

    def started(layers: slice, budget: int) -> Engine:
        def load_layers() -> LoadedModel:
            model, tokenizer = load(moe_dir)
            model.model.layers = model.layers[layers]
            return LoadedModel(model, tokenizer, "tiny")

        engine = Engine(load_layers, name="tiny", prompt_cache_bytes=budget, allow_scripted=True)
        engine.start()
        while engine.state == "loading":
            time.sleep(0.01)
        return engine

    requests = [Request(messages=[{"role": "user", "content": "Say something. " * n}], max_tokens=4,
                        scripted={"reply": "Fine."}) for n in (1, 3, 2, 5)]
    probe = started(slice(None), 2 << 30)
    answer(probe, requests[0])
    budget = probe.prompt_cache.nbytes * 5 // 2  # about two requests' entries: the later ones evict
    kept = []
    for layers in (slice(None), slice(0, 2)):
        engine = started(layers, budget)
        for request in requests:
            answer(engine, request)
        kept.append([entry.tokens for entry in engine.prompt_cache.entries.values()])
        engine.stop()
    probe.stop()
    assert len(kept[0]) < 2 * len(requests)  # some were dropped
    assert kept[1] == kept[0]
