"""The APIs coding agents speak, driven by their official clients against a real `qwenmlx serve`: Anthropic's
Messages API (`anthropic`) and OpenAI's Responses API (`openai`'s client.responses).

As in test_server.py, the model is random, so where a test needs a particular answer the request
carries a script (the tests' hook) and everything after the sampler is the real path.
"""

import json
import re

import anthropic
import openai
import pytest

from tests.serving import API_KEY, http, running_server, script, user

THOUGHT = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello! How can I help?"
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOL_CALL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINK = {"type": "enabled", "budget_tokens": 1024}

# message_start, then blocks (start, deltas, stop), then message_delta and message_stop: nothing else, in that order.
ANTHROPIC_ORDER = re.compile(r"message_start( content_block_start( content_block_delta)+ content_block_stop)*"
                             r" message_delta message_stop")


# --- Anthropic's Messages API ---


def test_a_streamed_message_comes_in_anthropics_event_order_and_accumulates_to_the_whole_message(server):
    client = server.anthropic_client()
    whole = client.messages.create(model="m", max_tokens=50, messages=user("Hi"), thinking=THINK,
                                   extra_headers=script(THOUGHT))
    events = list(client.messages.create(model="m", max_tokens=50, messages=user("Hi"), thinking=THINK, stream=True,
                                         extra_headers=script(THOUGHT)))
    assert ANTHROPIC_ORDER.fullmatch(" ".join(e.type for e in events))
    assert [e.content_block.type for e in events if e.type == "content_block_start"] == ["thinking", "text"]
    with client.messages.stream(model="m", max_tokens=50, messages=user("Hi"), thinking=THINK,
                                extra_headers=script(THOUGHT)) as stream:
        accumulated = stream.get_final_message()
    assert [b.to_dict(exclude_none=True) for b in accumulated.content] == \
        [b.to_dict(exclude_none=True) for b in whole.content]
    assert (accumulated.stop_reason, accumulated.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_a_thinking_turn_answers_with_a_thinking_block_then_a_text_block(server):
    message = server.anthropic_client().messages.create(model="m", max_tokens=50, messages=user("Hi"), thinking=THINK,
                                                 extra_headers=script(THOUGHT))
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == "The user greets me.\nI greet back."
    assert text.type == "text" and text.text == "Hello! How can I help?"
    assert message.stop_reason == "end_turn" and message.role == "assistant" and message.id.startswith("msg_")


def test_thinking_disabled_renders_qwens_no_thinking_prompt(server):
    client = server.anthropic_client()
    counts = {kind: client.messages.count_tokens(model="m", messages=user("Hi"), thinking={"type": kind, **extra})
              .input_tokens for kind, extra in (("enabled", {"budget_tokens": 1024}), ("disabled", {}))}
    assert counts["disabled"] > counts["enabled"]  # the template closes an empty thought in the prompt


def test_a_forced_tool_use_comes_back_as_a_tool_use_block_and_its_tool_result_goes_back_through_the_template(server):
    client = server.anthropic_client()
    ask = user("Weather in Paris?")
    call = client.messages.create(model="m", max_tokens=60, messages=ask, tools=[WEATHER],
                                  tool_choice={"type": "tool", "name": "get_weather"},
                                  extra_headers=script(TOOL_CALL_REPLY))
    [tool_use] = call.content
    assert tool_use.type == "tool_use" and tool_use.name == "get_weather" and tool_use.id.startswith("toolu_")
    assert tool_use.input == {"city": "Paris"} and call.stop_reason == "tool_use"

    events = list(client.messages.create(model="m", max_tokens=60, messages=ask, tools=[WEATHER], stream=True,
                                         extra_headers=script(TOOL_CALL_REPLY)))
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert [d.type for d in deltas] == ["input_json_delta"]
    assert json.loads(deltas[0].partial_json) == {"city": "Paris"}

    history = ask + [{"role": "assistant", "content": [tool_use.model_dump()]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                                   "content": '{"temperature": 21}'}]}]
    after = client.messages.create(model="m", max_tokens=60, messages=history, tools=[WEATHER],
                                   extra_headers=script("It is 21 degrees."))
    assert [(b.type, b.text) for b in after.content] == [("text", "It is 21 degrees.")]
    prompt = after.usage.input_tokens + after.usage.cache_read_input_tokens
    assert prompt > call.usage.input_tokens + call.usage.cache_read_input_tokens + call.usage.output_tokens


def test_a_stop_sequence_ends_the_text_before_it_and_is_named_in_the_answer(server):
    client = server.anthropic_client()
    kwargs = dict(model="m", max_tokens=60, messages=user("Say it"), stop_sequences=["zzz", "gamma"],
                  extra_headers=script("alpha beta gamma delta"))
    message = client.messages.create(**kwargs)
    assert [b.text for b in message.content] == ["alpha beta"]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "gamma")
    with client.messages.stream(**kwargs) as stream:
        assert stream.get_final_message().stop_sequence == "gamma"


def test_max_tokens_ends_a_message_with_stop_reason_max_tokens(server):
    message = server.anthropic_client().messages.create(model="m", max_tokens=3, messages=user("Hi"),
                                                 extra_headers=script("one two three four five six"))
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_count_tokens_counts_the_prompt_a_message_is_generated_after_and_a_repeat_reads_it_from_the_cache(server):
    client = server.anthropic_client()
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    kwargs = dict(model="m", system=system, messages=user("Count these tokens, please."), tools=[WEATHER])
    counted = client.messages.count_tokens(**kwargs).input_tokens
    first = client.messages.create(max_tokens=2, **kwargs)
    again = client.messages.create(max_tokens=2, **kwargs)
    for usage in (first.usage, again.usage):
        assert usage.input_tokens + usage.cache_read_input_tokens == counted
    assert again.usage.cache_read_input_tokens == counted - 1  # all but the last token, which gives the logits


def test_a_server_tool_of_anthropics_is_left_out_of_the_prompt_with_a_log_line(server):
    client = server.anthropic_client()
    web_search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    counted = {len(tools): client.messages.count_tokens(model="m", messages=user("Hi"), tools=tools).input_tokens
               for tools in ([WEATHER], [WEATHER, web_search])}
    assert counted[1] == counted[2]
    assert "tool 'web_search' (web_search_20250305) runs on Anthropic's servers" in server.log.read_text()


def test_a_wrong_key_is_401_in_anthropics_shape_and_a_bearer_token_is_accepted_too(server):
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=1, messages=user("Hi"))
    assert info.value.status_code == 401 and info.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=API_KEY, max_retries=0)
    assert bearer.messages.create(model="m", max_tokens=1, messages=user("Hi")).usage.output_tokens == 1


@pytest.mark.parametrize("body, says", [
    ({"messages": user("Hi")}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}, "image"),
    ({"max_tokens": 5, "messages": user("Hi"), "thinking": {"type": "sometimes"}}, "thinking"),
])
def test_a_bad_message_request_is_400_with_anthropics_error_shape(server, body, says):
    status, _, answer = http(f"{server.url}/v1/messages", json.dumps({"model": "m", **body}).encode(),
                             {"x-api-key": API_KEY, "content-type": "application/json"})
    assert status == 400 and answer["type"] == "error" and set(answer["error"]) == {"type", "message"}
    assert answer["error"]["type"] == "invalid_request_error" and says in answer["error"]["message"]


# --- OpenAI's Responses API ---


def test_a_response_has_a_reasoning_item_then_a_message_and_usage_with_cached_tokens(server):
    client = server.client()
    response = client.responses.create(model="m", input="Hi", instructions="Be kind.", reasoning={"effort": "high"},
                                       extra_headers=script(THOUGHT))
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "The user greets me.\nI greet back."
    assert message.type == "message" and response.output_text == "Hello! How can I help?"
    assert response.status == "completed"
    again = client.responses.create(model="m", input="Hi", instructions="Be kind.", reasoning={"effort": "high"},
                                    max_output_tokens=2)
    assert again.usage.input_tokens == response.usage.input_tokens
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens - 1
    assert again.status == "incomplete" and again.incomplete_details.reason == "max_output_tokens"


def test_a_streamed_response_sends_typed_events_that_accumulate_to_the_whole_response(server):
    client = server.client()
    whole = client.responses.create(model="m", input="Hi", extra_headers=script(THOUGHT))
    events = list(client.responses.create(model="m", input="Hi", stream=True, extra_headers=script(THOUGHT)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        whole.output[0].content[0].text
    with client.responses.stream(model="m", input="Hi", extra_headers=script(THOUGHT)) as stream:
        assert stream.get_final_response().output_text == whole.output_text


def test_a_function_call_comes_back_as_a_function_call_item_and_its_output_goes_back_through_the_template(server):
    client = server.client()
    tool = {"type": "function", "name": WEATHER["name"], "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"]}
    response = client.responses.create(model="m", input="Weather in Paris?", tools=[tool],
                                       extra_headers=script(TOOL_CALL_REPLY))
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert json.loads(call.arguments) == {"city": "Paris"}
    events = list(client.responses.create(model="m", input="Weather in Paris?", tools=[tool], stream=True,
                                          extra_headers=script(TOOL_CALL_REPLY)))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {"city": "Paris"}

    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}]
    after = client.responses.create(model="m", input=history, tools=[tool], extra_headers=script("It is 21 degrees."))
    assert after.output_text == "It is 21 degrees."
    assert after.usage.input_tokens > response.usage.input_tokens + response.usage.output_tokens


def test_previous_response_id_is_refused_with_a_400_that_says_the_server_is_stateless(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().responses.create(model="m", input="Hi", previous_response_id="resp_123")
    assert "stateless" in info.value.message and info.value.body["param"] == "previous_response_id"


# --- the prompt cache across a restart ---


def test_a_long_prompt_cached_on_disk_is_read_back_after_a_restart_but_never_by_another_model(
        moe_dir, moe_dir_other_weights, tmp_path):
    cache = ["--prompt-cache-dir", str(tmp_path / "prompt-cache")]
    ask = dict(model="m", max_tokens=6, extra_body={"temperature": 0.0}, thinking={"type": "disabled"},
               messages=user("Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 60))
    answers = []
    for model, log in ((moe_dir, "first.log"), (moe_dir, "restarted.log"), (moe_dir_other_weights, "other.log")):
        with running_server(model, tmp_path / log, *cache) as server:
            answers.append(server.anthropic_client().messages.create(**ask))
    first, restarted, other = answers
    prompt = first.usage.input_tokens
    assert prompt > 500 and first.usage.cache_read_input_tokens == 0
    assert restarted.usage.cache_read_input_tokens == prompt - 1 and restarted.usage.input_tokens == 1
    assert [b.text for b in restarted.content] == [b.text for b in first.content]
    assert other.usage.cache_read_input_tokens == 0 and other.usage.input_tokens == prompt
