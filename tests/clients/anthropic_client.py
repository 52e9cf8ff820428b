"""The Anthropic Messages API through the official `anthropic` package, checked with
`jsonschema`.

Run by tests/api/anthropic.rs against a live server with the real SmolLM2 model:
    python anthropic_client.py BASE_URL API_KEY
Greedy throughout (`temperature` 0 through `extra_body`: the SDK no longer offers sampling
settings, the API still takes them). A whole and a streamed message (the stream read with the client's own
event accumulation), count_tokens, tool use with `tool_choice` any and a named tool (whole
and streamed, inputs validated against the tool's schema), and a tool result fed back for
the final answer. Prints one JSON object; unexpected exceptions exit non-zero.
"""
import json
import sys

import anthropic
import jsonschema

base_url, key = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=120)
model = client.models.list().data[0].id

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"enum": ["UTC", "Europe/Paris", "America/New_York"]}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"name": "get_weather", "description": "Get the current weather in a city",
     "input_schema": WEATHER},
    {"name": "get_time", "description": "Get the current time in a timezone",
     "input_schema": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
errors = []


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def calls_of(message):
    return [{"name": b.name, "input": b.input} for b in message.content if b.type == "tool_use"]


question = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"extra_body": {"temperature": 0}}
kw = dict(model=model, max_tokens=40, messages=question, system="You are a helpful assistant.",
          **GREEDY)
whole = client.messages.create(**kw)
with client.messages.stream(**kw) as stream:
    for _ in stream.text_stream:
        pass
    streamed = stream.get_final_message()
counted = client.messages.count_tokens(model=model, messages=question,
                                       system="You are a helpful assistant.")


def tool_case(messages, tool_choice):
    kw = dict(model=model, max_tokens=100, messages=messages, tools=TOOLS,
              tool_choice=tool_choice, **GREEDY)
    m = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        s = stream.get_final_message()
    out = {"stop_reason": m.stop_reason, "calls": calls_of(m), "streamed_calls": calls_of(s),
           "streamed_stop_reason": s.stop_reason}
    for c in out["calls"] + out["streamed_calls"]:
        try:
            jsonschema.validate(c["input"], SCHEMAS[c["name"]])
        except (KeyError, jsonschema.ValidationError) as e:
            errors.append(f"{tool_choice}: {e}")
    return out, m


weather_q = [{"role": "user", "content": "What is the weather like in Paris today?"}]
any_case, message = tool_case(weather_q, {"type": "any", "disable_parallel_tool_use": True})
named_case, _ = tool_case([{"role": "user", "content": "What time is it in Paris?"}],
                          {"type": "tool", "name": "get_time"})

# The call goes back with its result; the model answers from it.
use = next(b for b in message.content if b.type == "tool_use")
follow = weather_q + [
    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                  "content": json.dumps({"temperature": 22, "sky": "sunny"})}]},
]
final = client.messages.create(model=model, max_tokens=60, messages=follow, tools=TOOLS,
                               **GREEDY)

# Errors come back as the client's typed exceptions.
try:
    client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=question)
    errors.append("an unknown model was accepted")
except anthropic.NotFoundError as e:
    if e.body["error"]["type"] != "not_found_error":
        errors.append(f"not found: {e.body}")

print(json.dumps({
    "whole": {"text": text_of(whole), "usage": whole.usage.model_dump(exclude_none=True),
              "stop_reason": whole.stop_reason},
    "streamed": {"text": text_of(streamed), "usage": streamed.usage.model_dump(exclude_none=True),
                 "stop_reason": streamed.stop_reason},
    "count_tokens": counted.input_tokens,
    "any": any_case,
    "named": named_case,
    "answer": text_of(final),
    "errors": errors,
}))
