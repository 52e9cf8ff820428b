"""Drives confab's OpenAI-compatible API with the official `openai` package.

Run by tests/api/openai.rs against a live server:
    python openai_client.py BASE_URL API_KEY
Prints one JSON object with what each call returned; the Rust test checks it. Any
unexpected exception makes the script exit non-zero with its traceback.
"""
import json
import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
out = {}

models = client.models.list()
model = models.data[0].id
out["models"] = [m.id for m in models.data]

messages = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Say hello."},
]
whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, seed=7, user="py-user"
)
out["whole"] = {
    "id": whole.id,
    "object": whole.object,
    "model": whole.model,
    "content": whole.choices[0].message.content,
    "role": whole.choices[0].message.role,
    "finish_reason": whole.choices[0].finish_reason,
    "usage": whole.usage.model_dump(),
}

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=12,
    temperature=0,
    seed=7,
    stream=True,
    stream_options={"include_usage": True},
    user="py-user",
)
pieces, finish, usage, ids = [], None, None, set()
for chunk in stream:
    ids.add(chunk.id)
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["streamed"] = {
    "pieces": pieces,
    "content": "".join(pieces),
    "finish_reason": finish,
    "usage": usage,
    "ids": len(ids),
}

# The legacy completions API: a prompt continued as written, whole and streamed.
prompt = "Once upon a time"
text = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                 logprobs=2)
text_pieces, text_finish = [], None
for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                       temperature=0, stream=True):
    for choice in chunk.choices:
        text_pieces.append(choice.text)
        text_finish = choice.finish_reason or text_finish
out["text"] = {
    "object": text.object,
    "id": text.id,
    "text": text.choices[0].text,
    "finish_reason": text.choices[0].finish_reason,
    "tokens": text.choices[0].logprobs.tokens,
    "token_logprobs": text.choices[0].logprobs.token_logprobs,
    "top_logprobs": text.choices[0].logprobs.top_logprobs,
    "text_offset": text.choices[0].logprobs.text_offset,
    "usage": text.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
    "streamed": "".join(text_pieces),
    "streamed_finish": text_finish,
}

# Errors arrive as the package's own exception types, with our code.
errors = {}
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as e:
    errors["model"] = [e.status_code, e.code]
try:
    openai.OpenAI(base_url=f"{base_url}/v1", api_key="cfk_wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    errors["key"] = [e.status_code, e.code]
try:
    client.chat.completions.create(model=model, messages=messages, temperature=7)
except openai.BadRequestError as e:
    errors["temperature"] = [e.status_code, e.code, e.param]
out["errors"] = errors

print(json.dumps(out))
