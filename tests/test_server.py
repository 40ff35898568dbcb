"""`qwenmlx serve` driven as a client would: a real server process on 127.0.0.1 and the official openai client.

The model is the tiny random MoE checkpoint, so what it writes is noise; the tests pin properties that
hold for any weights. Where a test needs a particular answer (thinking, a tool call, stop strings, a
long reply to cancel), the server runs with QWENMLX_TEST_HOOKS=1 and the request carries a script in
the x-qwenmlx-test-script header: the model runs every step as usual, but the sampler picks the
script's next token, and everything after it (detokenizing, parsing, the API shapes) is the real path.
"""

import asyncio
import json
import re
import threading
import time

import openai
import pytest

from qwenmlx.checkpoint import load
from qwenmlx.server import Engine, LoadedModel, create_app
from tests.serving import API_KEY, MAX_BATCH, MAX_QUEUE, ORIGIN, free_port, http, script, user, wait_until_healthy

LONG = 3000  # tokens of a reply that is cancelled long before it ends
GREEDY = dict(temperature=0.0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_models_lists_the_loaded_model_by_its_name(server, moe_dir):
    assert [m.id for m in server.client().models.list()] == [moe_dir.name]


def test_a_streamed_chat_equals_the_same_chat_unstreamed_and_usage_comes_only_when_asked(server):
    client = server.client()
    whole = client.chat.completions.create(model="m", messages=user("Hello there"), max_tokens=10, **GREEDY)
    chunks = list(client.chat.completions.create(model="m", messages=user("Hello there"), max_tokens=10,
                                                 stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None and c.choices for c in chunks)
    assert whole.usage.completion_tokens <= 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    with_usage = list(client.chat.completions.create(
        model="m", messages=user("Hello there"), max_tokens=10, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    *content, last = with_usage
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in content)


def test_the_second_turn_of_a_conversation_reuses_the_first_turns_cache(server):
    client = server.client()
    messages = user("What is 2+2?")
    first = client.chat.completions.create(model="m", messages=messages,
                                           extra_headers=script("<think>\nTwo and two.\n</think>\n\nFour."))
    assert first.choices[0].message.content == "Four."
    messages += [{"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0.0)
    # The template drops the first answer's thinking, so the cache can match up to the first prompt's end.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    again = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0.0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == second.choices[0].message.content


THOUGHT = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello! How can I help?"


def test_thinking_goes_to_reasoning_content_and_reasoning_never_to_content(server):
    client = server.client()
    message = client.chat.completions.create(model="m", messages=user("Hi"), extra_headers=script(THOUGHT))
    message = message.choices[0].message
    assert message.content == "Hello! How can I help?"
    assert message.reasoning_content == message.reasoning == "The user greets me.\nI greet back."

    chunks = list(client.chat.completions.create(model="m", messages=user("Hi"), stream=True,
                                                 extra_headers=script(THOUGHT)))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == message.content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning_content


def test_stop_strings_end_the_answer_before_them_even_across_token_boundaries(server):
    client = server.client()
    reply = "alpha beta gamma delta epsilon"
    for stop, expected in (("gamma", "alpha beta"), (["ta gam", "zzz"], "alpha be")):
        answer = client.chat.completions.create(model="m", messages=user("Say it"), stop=stop,
                                                extra_headers=script(reply))
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="m", messages=user("Say it"), stop=stop, stream=True,
                                                     extra_headers=script(reply)))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    completion = client.completions.create(model="m", prompt="Once upon", stop=["gamma"], extra_headers=script(reply))
    assert completion.choices[0].text == "alpha beta " and completion.choices[0].finish_reason == "stop"


def test_a_tool_call_in_the_models_output_becomes_tool_calls_and_its_result_goes_back_through_the_template(server):
    client = server.client()
    plain = client.chat.completions.create(model="m", messages=user("Weather in Paris?"), max_tokens=1)
    answer = client.chat.completions.create(model="m", messages=user("Weather in Paris?"), tools=[WEATHER_TOOL],
                                            extra_headers=script(TOOL_CALL_REPLY))
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools are in the prompt
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model="m", messages=user("Weather in Paris?"), tools=[WEATHER_TOOL],
                                                 stream=True, extra_headers=script(TOOL_CALL_REPLY)))
    [streamed] = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert streamed.index == 0 and streamed.function.name == "get_weather"
    assert json.loads(streamed.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    history = user("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    after = client.chat.completions.create(model="m", messages=history, tools=[WEATHER_TOOL],
                                           extra_headers=script("It is 21 degrees."))
    assert after.choices[0].message.content == "It is 21 degrees."
    assert after.usage.prompt_tokens > answer.usage.prompt_tokens + answer.usage.completion_tokens + 10


def test_a_malformed_tool_call_comes_back_as_content_with_a_note_in_the_log(server):
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    answer = server.client().chat.completions.create(model="m", messages=user("Weather?"), tools=[WEATHER_TOOL],
                                                     extra_headers=script(broken))
    assert answer.choices[0].message.content == broken.strip()
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert "malformed tool call" in server.log.read_text()


def test_completions_stream_and_whole_agree(server):
    client = server.client()
    whole = client.completions.create(model="m", prompt="The capital of France is", max_tokens=8, temperature=0.0)
    chunks = list(client.completions.create(model="m", prompt="The capital of France is", max_tokens=8,
                                            temperature=0.0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.usage.completion_tokens == 8 or whole.choices[0].finish_reason == "stop"


def test_logprobs_have_openais_shape_and_greedy_picks_the_likeliest(server):
    answer = server.client().chat.completions.create(model="m", messages=user("Hello"), max_tokens=6, logprobs=True,
                                                     top_logprobs=3, **GREEDY)
    entries = answer.choices[0].logprobs.content
    assert len(entries) <= answer.usage.completion_tokens and (entries or not answer.choices[0].message.content)
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)


def test_a_wrong_or_missing_api_key_is_401_but_health_needs_none(server):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert info.value.status_code == 401
    status, _, body = http(f"{server.url}/v1/models")
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert http(f"{server.url}/health")[0] == 200


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"model": "m"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages.0.role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), "n"),
])
def test_a_bad_request_is_400_with_openais_error_object(server, body, param):
    status, _, answer = http(f"{server.url}/v1/chat/completions", body,
                             {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert answer["error"]["param"] == param


def test_a_prompt_longer_than_the_context_is_400_that_says_so(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model="m", messages=user("word " * 5000))
    assert info.value.code == "context_length_exceeded" and "context" in info.value.message


def test_a_failure_during_generation_fails_that_request_with_500_and_the_server_keeps_serving(server):
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model="m", messages=user("Hi"),
                                                extra_headers=script(fail="cannot allocate"))
    assert info.value.status_code == 500 and "out of memory" in info.value.message
    assert server.client().chat.completions.create(model="m", messages=user("Hi"), max_tokens=2).choices


def test_a_closed_stream_stops_its_generation_and_the_next_request_starts_at_once(server):
    client = server.client()
    stream = client.chat.completions.create(model="m", messages=user("Tell me a story"), max_tokens=LONG,
                                            stream=True, extra_headers=script("once " * LONG))
    chunks = [next(stream) for _ in range(4)]
    stream.close()
    after = client.chat.completions.create(model="m", messages=user("Hi"), max_tokens=2)
    assert after.choices[0].finish_reason in ("stop", "length")
    generated = int(re.search(r"(\d+) generated", server.log_line(chunks[0].id)).group(1))
    assert "cancelled" in server.log_line(chunks[0].id) and generated < LONG


def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(server):
    server.wait_until_idle()  # the lines of earlier tests' requests are all written
    before = len(server.log_lines(": cancelled"))
    with pytest.raises(openai.APITimeoutError):
        server.client(timeout=0.5).chat.completions.create(model="m", messages=user("A long story, please"),
                                                           max_tokens=LONG, extra_headers=script("once " * LONG))
    line = server.wait_for_lines(": cancelled", before + 1)[-1]
    generated = re.search(r"(\d+) generated", line)  # none when it was cancelled while it waited to start
    assert generated is None or int(generated.group(1)) < LONG
    assert server.client().chat.completions.create(model="m", messages=user("Hi"), max_tokens=2).choices


def test_a_request_that_arrives_while_another_decodes_joins_the_batch_and_can_finish_first(server):
    client = server.client()
    stream = client.chat.completions.create(model="m", messages=user("Keep going"), max_tokens=LONG, stream=True,
                                            extra_headers=script("on " * LONG))
    first = next(c for c in stream if c.choices[0].delta.content)  # it is decoding
    short = client.chat.completions.create(model="m", messages=user("Hi"), max_tokens=2)
    assert short.choices[0].finish_reason in ("stop", "length")
    assert f"{first.id}:" not in server.log.read_text()  # the long answer is still being generated
    stream.close()


def test_past_max_batch_decoding_and_max_queue_waiting_the_server_answers_503_with_retry_after(server):
    client = server.client()
    streams = [client.chat.completions.create(model="m", messages=user(f"Keep going {i}"), max_tokens=LONG,
                                              stream=True, extra_headers=script("on " * LONG))
               for i in range(MAX_BATCH)]
    while http(f"{server.url}/health")[2]["running"] < MAX_BATCH:  # the batch is full
        time.sleep(0.05)

    async def fill_and_overflow():
        async_client = server.async_client()
        waiting = [asyncio.create_task(async_client.chat.completions.create(
            model="m", messages=user(f"Queued {i}"), max_tokens=1)) for i in range(MAX_QUEUE)]
        while http(f"{server.url}/health")[2]["waiting"] < MAX_QUEUE:
            await asyncio.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as info:
            await async_client.chat.completions.create(model="m", messages=user("One too many"), max_tokens=1)
        for stream in streams:
            stream.close()
        answers = await asyncio.gather(*waiting)
        return info.value, answers

    overflow, answers = asyncio.run(fill_and_overflow())
    assert overflow.status_code == 503 and int(overflow.response.headers["retry-after"]) > 0
    assert all(a.choices[0].finish_reason for a in answers)


@pytest.mark.parametrize("clients", [4, 8])  # 8: twice the batch, so half of them join as others finish
def test_clients_at_once_each_get_the_answer_they_get_alone(server, clients):
    prompts = [f"Question number {i}: what is {i} times {i}?" for i in range(clients)]
    client = server.client()
    alone = [client.chat.completions.create(model="m", messages=user(p), max_tokens=12, **GREEDY) for p in prompts]

    async def together():
        async_client = server.async_client()
        return await asyncio.gather(*[async_client.chat.completions.create(
            model="m", messages=user(p), max_tokens=12, **GREEDY) for p in prompts])

    for single, concurrent in zip(alone, asyncio.run(together())):
        assert concurrent.choices[0].message.content == single.choices[0].message.content
        assert concurrent.usage.completion_tokens == single.usage.completion_tokens
        assert concurrent.choices[0].finish_reason == single.choices[0].finish_reason


def test_cors_headers_only_for_the_allowed_origin(server):
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
    status, head, _ = http(f"{server.url}/v1/chat/completions", headers=headers, method="OPTIONS")
    assert status == 200 and head["access-control-allow-origin"] == ORIGIN
    status, head, _ = http(f"{server.url}/v1/chat/completions", method="OPTIONS",
                           headers={**headers, "Origin": "http://elsewhere.example"})
    assert head.get("access-control-allow-origin") is None


def test_health_is_503_until_the_model_has_loaded_and_cors_is_off_unless_asked(moe_dir):
    import uvicorn

    loaded = threading.Event()
    engine = Engine(lambda: (loaded.wait(), LoadedModel(*load(moe_dir), "tiny"))[1], name="tiny")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    engine.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.05)
        status, head, body = http(f"{url}/health", headers={"Origin": ORIGIN})
        assert status == 503 and body["status"] == "loading"
        assert head.get("access-control-allow-origin") is None
        status, _, body = http(f"{url}/v1/chat/completions", json.dumps({"messages": user("Hi")}).encode())
        assert status == 503 and "loading" in body["error"]["message"]
        loaded.set()
        wait_until_healthy(url, None, None)
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()
