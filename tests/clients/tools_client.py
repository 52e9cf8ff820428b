"""Tool calling through the official `openai` package, checked with `jsonschema`.

Run by tests/api/tools.rs against a live server with the real SmolLM2 model:
    python tools_client.py BASE_URL API_KEY
Greedy throughout. For `tool_choice="required"` and for a named function it asks whole and
streamed, rebuilds the streamed calls from their deltas (index, id, name, argument pieces)
as OpenAI's clients do, and validates the arguments against the tool's schema; then it
feeds a result back and asks for the final answer. Prints one JSON object; unexpected
exceptions exit non-zero.
"""
import json
import sys

import jsonschema
import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)
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
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": WEATHER}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current time in a timezone",
        "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def streamed(**kw):
    """The streamed reply: content, calls rebuilt from deltas, finish reason."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                call["id"] = d.id
            if d.function and d.function.name:
                call["name"] += d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
        finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def case(messages, tool_choice):
    kw = dict(model=model, messages=messages, tools=TOOLS, tool_choice=tool_choice,
              temperature=0, max_tokens=100, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw)
    m = whole.choices[0].message
    whole_calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                   for c in m.tool_calls or []]
    s_content, s_calls, s_finish = streamed(**kw)
    out = {
        "whole_content": m.content,
        "whole_calls": whole_calls,
        "whole_finish": whole.choices[0].finish_reason,
        "streamed_content": s_content,
        "streamed_calls": s_calls,
        "streamed_finish": s_finish,
        "errors": [],
    }
    for kind in ("whole_calls", "streamed_calls"):
        for c in out[kind]:
            try:
                jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
            except (ValueError, KeyError, jsonschema.ValidationError) as e:
                out["errors"].append(f"{kind}: {e}")
    return out, m


ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
required, message = case(ask, "required")
named, _ = case([{"role": "user", "content": "What time is it in Paris?"}],
                {"type": "function", "function": {"name": "get_time"}})

# The call goes back with its result; the model answers from it.
call = message.tool_calls[0]
follow = ask + [
    message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id,
     "content": json.dumps({"temperature": 22, "sky": "sunny"})},
]
final = client.chat.completions.create(model=model, messages=follow, tools=TOOLS,
                                       temperature=0, max_tokens=60)
print(json.dumps({
    "required": required,
    "named": named,
    "final": {
        "content": final.choices[0].message.content,
        "tool_calls": len(final.choices[0].message.tool_calls or []),
        "finish": final.choices[0].finish_reason,
    },
}))
