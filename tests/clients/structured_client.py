"""Structured output through the official `openai` package, checked with `jsonschema`.

Run by tests/api/structured.rs against a live server with the real SmolLM2 model:
    python structured_client.py BASE_URL API_KEY
For each fixed schema and prompt it asks twice (whole and streamed, greedy), validates both
replies with jsonschema, and prints one JSON object: per case the two texts, their finish
reasons and the validation errors (none expected). Unexpected exceptions exit non-zero.
"""
import json
import sys

import jsonschema
import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)
model = client.models.list().data[0].id

CASES = {
    "person": (
        "Describe a person called Alice who is 30 years old and likes tea and chess.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
            },
            "required": ["name", "age", "hobbies"],
            "additionalProperties": False,
        },
    ),
    "city": (
        "What is the capital of France, and its country?",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "country": {"type": "string", "maxLength": 40},
                "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
            },
            "required": ["city", "country", "continent"],
            "additionalProperties": False,
        },
    ),
    "order": (
        "Make an order of two items: three apples at 0.5 each and one bread at 2.25.",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "product": {"type": "string", "maxLength": 30},
                            "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                            "price": {"type": "number", "minimum": 0, "maximum": 1000},
                        },
                        "required": ["product", "quantity", "price"],
                        "additionalProperties": False,
                    },
                },
                "paid": {"type": "boolean"},
            },
            "required": ["items", "paid"],
            "additionalProperties": False,
        },
    ),
}

out = {}
for name, (prompt, schema) in CASES.items():
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": prompt + " Answer in JSON."}]
    whole = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=300, response_format=fmt
    )
    pieces, finish = [], None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=300,
        response_format=fmt, stream=True,
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    case = {
        "whole": whole.choices[0].message.content,
        "whole_finish": whole.choices[0].finish_reason,
        "streamed": "".join(pieces),
        "streamed_finish": finish,
        "errors": [],
    }
    for kind in ("whole", "streamed"):
        try:
            jsonschema.validate(json.loads(case[kind]), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            case["errors"].append(f"{kind}: {e}")
    out[name] = case
print(json.dumps(out))
