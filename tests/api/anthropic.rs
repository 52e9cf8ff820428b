//! The Anthropic Messages API against the real server: with the tiny generated model, the
//! wire format as bytes (named SSE events in Anthropic's order, whole messages, stop
//! reasons, usage), tool use held to the tool's schema and round-tripped, Anthropic-shaped
//! errors, and the usage accounting it shares with the other APIs; with the real SmolLM2,
//! the official `anthropic` Python package (tests/clients/anthropic_client.py).

use reqwest::StatusCode;
use serde_json::{json, Value};

use confab::engine::{ModelSlot, ModelStatus};

use crate::common::{Backend, TestServer};
use crate::structured::check;
use crate::tools::{schema_of, tiny_model};

const MODEL: &str = "tiny-llama";

async fn post(s: &TestServer, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut r = s
        .http
        .post(format!("{}{path}", s.base))
        .header("anthropic-version", "2023-06-01")
        .json(body);
    if let Some(key) = key {
        r = r.header("x-api-key", key);
    }
    r.send().await.expect("request")
}

async fn whole(s: &TestServer, key: &str, body: &Value) -> Value {
    let r = post(s, "/v1/messages", Some(key), body).await;
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// The named events of a streamed reply, in order.
async fn events(s: &TestServer, key: &str, body: &Value) -> Vec<(String, Value)> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = post(s, "/v1/messages", Some(key), &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let mut out = Vec::new();
    for frame in text.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let mut name = None;
        let mut data = None;
        for line in frame.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<Value>(d).unwrap());
            }
        }
        let (name, data) = (name.expect("named event"), data.expect("event data"));
        assert_eq!(data["type"], name.as_str(), "{data}");
        out.push((name, data));
    }
    out
}

/// A streamed reply put back together as Anthropic's clients do: its content blocks (text
/// joined, tool inputs parsed from their JSON pieces), stop reason, stop sequence and output
/// tokens; checks the events come in Anthropic's order.
fn assemble(events: &[(String, Value)]) -> (Vec<Value>, Value, Value, Value) {
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["message_start", "ping"], "{names:?}");
    assert_eq!(
        names[names.len() - 2..],
        ["message_delta", "message_stop"],
        "{names:?}"
    );
    let start = &events[0].1["message"];
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    let mut blocks: Vec<Value> = Vec::new();
    let mut partial: Vec<String> = Vec::new();
    let mut open = None;
    for (name, e) in &events[2..events.len() - 2] {
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(open, None, "a block starts only after the last one stopped");
                let i = e["index"].as_u64().unwrap() as usize;
                assert_eq!(i, blocks.len());
                blocks.push(e["content_block"].clone());
                partial.push(String::new());
                open = Some(i);
            }
            "content_block_delta" => {
                let i = e["index"].as_u64().unwrap() as usize;
                assert_eq!(open, Some(i));
                let d = &e["delta"];
                match d["type"].as_str().unwrap() {
                    "text_delta" => {
                        let t = blocks[i]["text"].as_str().unwrap().to_string();
                        blocks[i]["text"] = json!(t + d["text"].as_str().unwrap());
                    }
                    "input_json_delta" => partial[i].push_str(d["partial_json"].as_str().unwrap()),
                    other => panic!("delta type {other}"),
                }
            }
            "content_block_stop" => {
                assert_eq!(open, Some(e["index"].as_u64().unwrap() as usize));
                open = None;
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert_eq!(open, None, "every block is stopped");
    for (b, p) in blocks.iter_mut().zip(&partial) {
        if b["type"] == "tool_use" {
            b["input"] = serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}"));
        }
    }
    let delta = &events[events.len() - 2].1;
    (
        blocks,
        delta["delta"]["stop_reason"].clone(),
        delta["delta"]["stop_sequence"].clone(),
        delta["usage"]["output_tokens"].clone(),
    )
}

fn ask(max_tokens: u32) -> Value {
    json!({"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "hello there"}]})
}

fn text_of(v: &Value) -> String {
    v["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "text")
        .map(|b| b["text"].as_str().unwrap())
        .collect()
}

async fn messages_whole_and_streamed(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model(2)).await;
    let t = s.tenant("acme").await;
    let mut body = ask(12);
    body["metadata"] = json!({"user_id": "ann"});
    let w = whole(&s, &t.key, &body).await;
    assert!(w["id"].as_str().unwrap().starts_with("msg_"), "{w}");
    assert_eq!(w["type"], "message");
    assert_eq!(w["role"], "assistant");
    assert_eq!(w["model"], MODEL);
    assert_eq!(w["stop_reason"], "max_tokens", "{w}");
    assert_eq!(w["stop_sequence"], Value::Null);
    assert_eq!(w["usage"]["output_tokens"], 12);
    let input = w["usage"]["input_tokens"].as_u64().unwrap();
    assert!(input > 5, "{w}");
    let text = text_of(&w);
    assert!(!text.is_empty());

    // Streamed, greedy: the same reply, in Anthropic's events.
    let ev = events(&s, &t.key, &body).await;
    assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], input);
    let (blocks, stop_reason, stop_sequence, output) = assemble(&ev);
    assert_eq!(blocks, w["content"].as_array().unwrap().clone());
    assert_eq!(stop_reason, "max_tokens");
    assert_eq!(stop_sequence, Value::Null);
    assert_eq!(output, 12);

    // A stop sequence from the middle of that reply ends it there, and is named.
    let chars: Vec<char> = text.chars().collect();
    let at = chars.len() / 2;
    let stop: String = chars[at..at + 2].iter().collect();
    let before: String = text[..text.find(&stop).unwrap()].to_string();
    let mut stopping = body.clone();
    stopping["stop_sequences"] = json!([stop.clone(), "never appears"]);
    let st = whole(&s, &t.key, &stopping).await;
    assert_eq!(st["stop_reason"], "stop_sequence", "{st}");
    assert_eq!(st["stop_sequence"], stop.as_str());
    assert_eq!(text_of(&st), before);
    let (blocks, stop_reason, stop_sequence, _) = assemble(&events(&s, &t.key, &stopping).await);
    assert_eq!(blocks, st["content"].as_array().unwrap().clone());
    assert_eq!(stop_reason, "stop_sequence");
    assert_eq!(stop_sequence, stop.as_str());

    // Content as blocks and a system prompt as blocks are the same conversation.
    let mut blocks_body = body.clone();
    blocks_body["system"] = json!([{"type": "text", "text": "Be brief."}]);
    blocks_body["messages"] = json!([{"role": "user",
        "content": [{"type": "text", "text": "hello there"}]}]);
    assert_eq!(
        whole(&s, &t.key, &blocks_body).await["content"],
        w["content"]
    );

    // count_tokens: the prompt as the model gets it.
    let r = post(&s, "/v1/messages/count_tokens", Some(&t.key), &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c, json!({"input_tokens": input}));

    // Usage is counted under metadata.user_id, like the other APIs' `user`.
    let (st, usage) = s.get("/api/v1/usage?user_id=ann", &t.key).await;
    assert_eq!(st, StatusCode::OK, "{usage}");
    assert_eq!(usage["totals"]["prompt_tokens"], 5 * input, "{usage}");
    s.stop().await;
}

fn tools() -> Value {
    let openai = crate::tools::tools();
    let tools: Vec<Value> = openai
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let f = &t["function"];
            let mut tool = json!({"name": f["name"], "input_schema": f["parameters"]});
            if let Some(d) = f.get("description") {
                tool["description"] = d.clone();
            }
            tool
        })
        .collect();
    json!(tools)
}

fn tool_ask(choice: Value, seed: u64) -> Value {
    json!({"model": MODEL, "max_tokens": 200, "temperature": 1.0, "top_k": 40,
        "messages": [{"role": "user", "content": "Use a tool."}],
        "tools": tools(), "tool_choice": choice, "metadata": {"user_id": format!("s{seed}")}})
}

async fn tool_use_round_trips(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model(2)).await;
    let t = s.tenant("acme").await;
    for (seed, choice) in [
        (1, json!({"type": "any", "disable_parallel_tool_use": true})),
        (2, json!({"type": "tool", "name": "note"})),
    ] {
        let mut body = tool_ask(choice.clone(), seed);
        // Sampling is seeded through the engine's seed: the same reply streamed.
        body["temperature"] = json!(0);
        let w = whole(&s, &t.key, &body).await;
        assert_eq!(w["stop_reason"], "tool_use", "{w}");
        let uses: Vec<&Value> = w["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .collect();
        assert_eq!(uses.len(), 1, "{w}");
        let call = uses[0];
        let name = call["name"].as_str().unwrap();
        if choice["type"] == "tool" {
            assert_eq!(name, "note");
        }
        check(&schema_of(name), &call["input"], name).unwrap();
        let (blocks, stop_reason, _, _) = assemble(&events(&s, &t.key, &body).await);
        assert_eq!(stop_reason, "tool_use");
        let streamed: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "tool_use").collect();
        assert_eq!(streamed.len(), 1);
        assert_eq!(streamed[0]["name"], call["name"]);
        assert_eq!(streamed[0]["input"], call["input"]);

        // The result goes back; the model answers.
        let mut next = body.clone();
        // The same tools shown (`auto`), so the prompts differ by the call and its result.
        next["tool_choice"] = json!({"type": "auto"});
        next["max_tokens"] = json!(8);
        next["messages"] = json!([
            {"role": "user", "content": "Use a tool."},
            {"role": "assistant", "content": w["content"]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call["id"], "content": "done"},
                {"type": "text", "text": "Thanks."}]},
        ]);
        let answer = whole(&s, &t.key, &next).await;
        assert!(
            answer["usage"]["input_tokens"].as_u64().unwrap()
                > w["usage"]["input_tokens"].as_u64().unwrap(),
            "the call and its result are in the prompt"
        );
    }
    // Structured output (`output_config.format`, and the beta's `output_format`): the text
    // parses and matches the schema, whole and streamed.
    let schema = schema_of("pick");
    for (seed, key) in [(3, "output_config"), (4, "output_format")] {
        let mut body = json!({"model": MODEL, "max_tokens": 100, "temperature": 1.0,
            "metadata": {"user_id": format!("j{seed}")},
            "messages": [{"role": "user", "content": "Pick."}]});
        let format = json!({"type": "json_schema", "schema": schema});
        body[key] = if key == "output_config" {
            json!({"format": format})
        } else {
            format
        };
        let w = whole(&s, &t.key, &body).await;
        assert_eq!(w["stop_reason"], "end_turn", "{w}");
        let text = text_of(&w);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        check(&schema, &v, "$").unwrap();
        let (blocks, _, _, _) = assemble(&events(&s, &t.key, &body).await);
        let streamed: Value = serde_json::from_str(blocks[0]["text"].as_str().unwrap()).unwrap();
        check(&schema, &streamed, "$").unwrap();
    }
    s.stop().await;
}

/// Checks an error has Anthropic's shape; returns its message.
fn anthropic_error(status: StatusCode, v: &Value, want: u16, kind: &str) -> String {
    assert_eq!(status.as_u16(), want, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

async fn errors_have_anthropic_shape(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model(1)).await;
    let t = s.tenant("acme").await;
    let r = post(&s, "/v1/messages", None, &ask(5)).await;
    let st = r.status();
    anthropic_error(st, &r.json().await.unwrap(), 401, "authentication_error");
    let r = post(
        &s,
        "/v1/messages",
        Some("wrong-key-0123456789abcdef"),
        &ask(5),
    )
    .await;
    let st = r.status();
    anthropic_error(st, &r.json().await.unwrap(), 401, "authentication_error");

    let change = |f: &dyn Fn(&mut Value)| {
        let mut b = ask(5);
        f(&mut b);
        b
    };
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            change(&|b| {
                b.as_object_mut().unwrap().remove("max_tokens");
            }),
            400,
            "invalid_request_error",
            "max_tokens is required",
        ),
        (
            change(&|b| b["model"] = json!("claude-sonnet-4-5")),
            404,
            "not_found_error",
            "claude-sonnet-4-5",
        ),
        (
            change(&|b| b["temperature"] = json!(1.5)),
            400,
            "invalid_request_error",
            "temperature",
        ),
        (
            change(&|b| {
                b["messages"] = json!([{"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
            }),
            400,
            "invalid_request_error",
            "messages[0].content[1].type",
        ),
        (
            change(&|b| {
                b["messages"] = json!([{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "The answer is"}])
            }),
            400,
            "invalid_request_error",
            "final assistant message",
        ),
        (
            change(&|b| b["messages"] = json!([{"role": "system", "content": "x"}])),
            400,
            "invalid_request_error",
            "messages[0].role",
        ),
        (
            change(&|b| b["thinking"] = json!({"type": "enabled", "budget_tokens": 1024})),
            400,
            "invalid_request_error",
            "thinking",
        ),
        (
            change(&|b| {
                b["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}])
            }),
            400,
            "invalid_request_error",
            "tools[0].type",
        ),
        (
            change(&|b| {
                b["tools"] = tools();
                b["tool_choice"] = json!({"type": "tool", "name": "missing"});
            }),
            400,
            "invalid_request_error",
            "tool_choice.name",
        ),
        (
            change(&|b| {
                b["messages"] = json!([{"role": "user", "content": [
                    {"type": "tool_use", "id": "x", "name": "note", "input": {}}]}])
            }),
            400,
            "invalid_request_error",
            "belong in assistant messages",
        ),
        (
            change(&|b| b["output_config"] = json!({"effort": "high"})),
            400,
            "invalid_request_error",
            "output_config.effort",
        ),
        (
            change(&|b| {
                b["output_config"] = json!({"format": {"type": "json_schema",
                    "schema": {"type": "object", "if": {"type": "object"}}}})
            }),
            400,
            "invalid_request_error",
            "output_config.format",
        ),
        (
            change(&|b| b["max_tokens"] = json!(100_000)),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
    ];
    for (body, status, kind, needle) in cases {
        let r = post(&s, "/v1/messages", Some(&t.key), &body).await;
        let st = r.status();
        let message = anthropic_error(st, &r.json().await.unwrap(), status, kind);
        assert!(
            message.contains(needle),
            "{message:?} should name {needle:?}"
        );
    }
    // Bad JSON, and a GET where only POST is served.
    let r = s
        .http
        .post(format!("{}/v1/messages", s.base))
        .header("x-api-key", &t.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let st = r.status();
    anthropic_error(st, &r.json().await.unwrap(), 400, "invalid_request_error");
    let r = s
        .http
        .get(format!("{}/v1/messages", s.base))
        .header("x-api-key", &t.key)
        .send()
        .await
        .unwrap();
    let st = r.status();
    anthropic_error(st, &r.json().await.unwrap(), 405, "invalid_request_error");
    s.stop().await;
}

crate::backend_tests!(
    messages_whole_and_streamed,
    tool_use_round_trips,
    errors_have_anthropic_shape,
);

/// The official `anthropic` package against SmolLM2: whole and streamed messages, tool use
/// (any / named, whole and streamed) with inputs valid against the schema, a tool result
/// fed back, count_tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_python_package_round_trips() {
    let model = ModelSlot::new(ModelStatus::Ready(crate::smollm2::engine().clone()));
    let s = TestServer::start_full(Backend::Sqlite, Default::default(), model).await;
    let t = s.tenant("py").await;
    let r = crate::common::run_python_client("anthropic_client.py", &s.base, &t.key).await;
    assert_eq!(r["errors"], json!([]), "{r}");
    let whole = &r["whole"];
    assert!(whole["text"].as_str().unwrap().contains("Paris"), "{whole}");
    assert_eq!(
        r["streamed"]["text"], whole["text"],
        "greedy: the same reply"
    );
    assert_eq!(r["streamed"]["usage"], whole["usage"]);
    assert_eq!(r["count_tokens"], whole["usage"]["input_tokens"]);
    for case in ["any", "named"] {
        let c = &r[case];
        assert_eq!(c["stop_reason"], "tool_use", "{case}: {c}");
        assert_eq!(c["streamed_calls"], c["calls"], "{case}: {c}");
    }
    assert_eq!(r["named"]["calls"][0]["name"], "get_time");
    assert_eq!(r["any"]["calls"][0]["input"]["city"], "Paris", "{r}");
    assert!(
        r["answer"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("sunny"),
        "{r}"
    );
    s.stop().await;
}
