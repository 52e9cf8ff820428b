//! Tool calling on the OpenAI API. With the tiny model's random weights sampled at
//! temperature 1, `tool_choice: "required"` and a named function still give calls whose
//! arguments match the tool's schema (decoding is constrained), whole and streamed alike;
//! tool results go back into the prompt; bad tool requests are refused by name. With the
//! real SmolLM2, the official `openai` package calls, streams and answers from a result
//! (tests/clients/tools_client.py).

use serde_json::{json, Value};

use confab::engine::{ModelSlot, ModelStatus};

use crate::common::{Backend, TestServer};
use crate::structured::check;

const MODEL: &str = "tiny-llama";

/// The tiny model with room for the tool prompt, which its byte tokens spell out long.
pub(crate) fn tiny_model(max_batch: usize) -> ModelSlot {
    static PATH: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    let (_, path) = PATH.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = crate::tiny::write_with_context(dir.path(), "llama", 4096);
        (dir, path)
    });
    let opts = confab::engine::EngineOptions {
        threads: Some(1),
        max_batch,
        ..Default::default()
    };
    let handle = confab::engine::load(path.clone(), opts).expect("load tiny model");
    ModelSlot::new(ModelStatus::Ready(handle))
}

pub(crate) fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "pick", "description": "Pick a thing.",
            "parameters": {"type": "object", "properties": {
                "colour": {"enum": ["red", "green", "blue"]},
                "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["colour", "count"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "note",
            "parameters": {"type": "object", "properties": {
                "text": {"type": "string", "maxLength": 8}},
                "required": ["text"], "additionalProperties": false}}},
    ])
}

pub(crate) fn schema_of(name: &str) -> Value {
    tools()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap_or_else(|| panic!("no tool {name}"))["function"]["parameters"]
        .clone()
}

async fn post(s: &TestServer, key: &str, body: &Value) -> reqwest::Response {
    s.http
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("request")
}

/// (name, arguments) of each call, the content, the finish reason.
type Reply = (Vec<(String, String)>, Option<String>, String);

async fn whole(s: &TestServer, key: &str, body: &Value) -> Reply {
    let r = post(s, key, body).await;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    let calls = c["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            assert_eq!(t["type"], "function", "{t}");
            assert!(t["id"].as_str().unwrap().starts_with("call_"), "{t}");
            (
                t["function"]["name"].as_str().unwrap().to_string(),
                t["function"]["arguments"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (
        calls,
        c["message"]["content"].as_str().map(String::from),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// The streamed reply, its calls rebuilt from the deltas as OpenAI's clients do.
async fn streamed(s: &TestServer, key: &str, body: &Value) -> Reply {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = post(s, key, &body).await;
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    let (mut calls, mut content, mut finish) = (Vec::<(String, String)>::new(), None, "".into());
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let c = &chunk["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            content.get_or_insert_with(String::new).push_str(t);
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if let Some(name) = d["function"]["name"].as_str() {
                // The first delta of a call names it, with its id.
                assert_eq!(i, calls.len(), "{d}");
                assert!(d["id"].as_str().unwrap().starts_with("call_"), "{d}");
                assert_eq!(d["type"], "function");
                calls.push((name.to_string(), String::new()));
            }
            calls[i]
                .1
                .push_str(d["function"]["arguments"].as_str().unwrap());
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (calls, content, finish)
}

fn validate(calls: &[(String, String)]) {
    for (name, args) in calls {
        let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args}"));
        check(&schema_of(name), &v, name).unwrap();
    }
}

fn ask(choice: Value, seed: u64) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Use a tool."}],
        "tools": tools(), "tool_choice": choice, "temperature": 1.0, "seed": seed,
        "max_tokens": 200, "parallel_tool_calls": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_calls_match_the_schema() {
    let s = TestServer::start_full(Backend::Sqlite, Default::default(), tiny_model(4)).await;
    let t = s.tenant("acme").await;
    for seed in 0..4 {
        let body = ask(json!("required"), seed);
        let w = whole(&s, &t.key, &body).await;
        assert_eq!(w.2, "tool_calls", "{w:?}");
        assert_eq!(w.1, None, "a reply of calls has no content: {w:?}");
        assert_eq!(w.0.len(), 1, "parallel_tool_calls is false: {w:?}");
        validate(&w.0);
        // The same seed streamed: the same call, in pieces.
        assert_eq!(streamed(&s, &t.key, &body).await, w, "seed {seed}");

        let named = ask(
            json!({"type": "function", "function": {"name": "note"}}),
            seed,
        );
        let n = whole(&s, &t.key, &named).await;
        assert_eq!(n.0.len(), 1, "{n:?}");
        assert_eq!(n.0[0].0, "note");
        validate(&n.0);
        assert_eq!(streamed(&s, &t.key, &named).await, n, "seed {seed}");
    }
    // Parallel calls: every complete one validates.
    let mut body = ask(json!("required"), 7);
    body["parallel_tool_calls"] = json!(true);
    let (calls, _, finish) = whole(&s, &t.key, &body).await;
    assert!(!calls.is_empty());
    let complete = if finish == "length" {
        &calls[..calls.len() - 1]
    } else {
        assert_eq!(finish, "tool_calls");
        &calls[..]
    };
    validate(complete);
    // Batched: calls, constrained replies and free text side by side keep their own state.
    let runs = (0..6u64).map(|i| {
        let (s, key) = (&s, t.key.clone());
        async move {
            let body = match i % 3 {
                0 => ask(json!("required"), 50 + i),
                1 => ask(
                    json!({"type": "function", "function": {"name": "pick"}}),
                    50 + i,
                ),
                _ => json!({"model": MODEL, "max_tokens": 12, "temperature": 1.0, "seed": i,
                    "messages": [{"role": "user", "content": "hi"}]}),
            };
            (i, whole(s, &key, &body).await)
        }
    });
    for (i, (calls, content, finish)) in futures_util::future::join_all(runs).await {
        if i % 3 == 2 {
            assert!(calls.is_empty() && content.is_some(), "{i}");
        } else {
            assert_eq!(finish, "tool_calls", "{i}");
            validate(&calls);
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_go_back_and_bad_requests_are_refused() {
    let s = TestServer::start_full(Backend::Sqlite, Default::default(), tiny_model(1)).await;
    let t = s.tenant("acme").await;
    let history = json!([
        {"role": "user", "content": "Pick one."},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "pick", "arguments": "{\"colour\": \"red\", \"count\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]);
    for choice in ["auto", "none"] {
        let body = json!({"model": MODEL, "messages": history, "tools": tools(),
            "tool_choice": choice, "max_tokens": 8, "temperature": 0});
        let r = post(&s, &t.key, &body).await;
        assert_eq!(
            r.status().as_u16(),
            200,
            "{choice}: {}",
            r.text().await.unwrap()
        );
    }
    // The result is in the prompt (as the fallback prompt writes it): it costs tokens.
    let usage = |body: Value| {
        let s = &s;
        let key = t.key.clone();
        async move {
            let v: Value = post(s, &key, &body).await.json().await.unwrap();
            v["usage"]["prompt_tokens"].as_u64().unwrap()
        }
    };
    let short = usage(json!({"model": MODEL, "messages": [history[0]], "max_tokens": 1})).await;
    let long = usage(json!({"model": MODEL, "messages": history, "max_tokens": 1})).await;
    assert!(long > short + 10, "{short} vs {long}");

    let base = |f: &dyn Fn(&mut Value)| {
        let mut b = json!({"model": MODEL, "messages": history, "tools": tools()});
        f(&mut b);
        b
    };
    for (body, param, needle) in [
        (
            base(&|b| b["messages"][2] = json!({"role": "tool", "content": "x"})),
            "messages[2].tool_call_id",
            "required",
        ),
        (
            base(&|b| b["messages"][0]["tool_calls"] = history[1]["tool_calls"].clone()),
            "messages[0].tool_calls",
            "assistant",
        ),
        (
            base(&|b| b["messages"][0]["role"] = json!("function")),
            "messages[0].role",
            "deprecated",
        ),
        (
            base(&|b| b["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}})),
            "tool_choice.function.name",
            "nope",
        ),
        (
            base(&|b| b["tool_choice"] = json!("sometimes")),
            "tool_choice",
            "required",
        ),
        (
            base(&|b| {
                b["tools"] = json!([]);
                b["tool_choice"] = json!("required");
            }),
            "tool_choice",
            "tools",
        ),
        (
            base(&|b| b["tools"][0]["type"] = json!("retrieval")),
            "tools[0].type",
            "function",
        ),
        (
            base(&|b| b["tools"][0]["function"]["name"] = json!("bad name")),
            "tools[0].function.name",
            "letters",
        ),
        (
            base(&|b| b["tools"][1]["function"]["name"] = json!("pick")),
            "tools[1].function.name",
            "two tools",
        ),
        (
            base(&|b| b["tools"][0]["function"]["parameters"] = json!("x")),
            "tools[0].function.parameters",
            "object",
        ),
        (
            base(&|b| b["tools"] = json!(vec![tools()[1].clone(); 129])),
            "tools",
            "128",
        ),
        (
            base(&|b| b["response_format"] = json!({"type": "json_object"})),
            "response_format",
            "tools",
        ),
        (
            base(&|b| {
                b["tools"][1]["function"]["parameters"] =
                    json!({"type": "object", "if": {"type": "object"}});
                b["tool_choice"] = json!("required");
            }),
            "tools",
            "\"note\"",
        ),
    ] {
        let r = post(&s, &t.key, &body).await;
        assert_eq!(r.status().as_u16(), 400, "{param}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{param}: {v}"
        );
    }
    // tool_choice none with a response_format: the format holds, no tools are offered.
    let body = base(&|b| {
        b["tool_choice"] = json!("none");
        b["response_format"] = json!({"type": "json_object"});
        b["max_tokens"] = json!(100);
    });
    let (calls, content, _) = whole(&s, &t.key, &body).await;
    assert!(calls.is_empty());
    assert!(serde_json::from_str::<Value>(&content.unwrap()).is_ok());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_calls_tools_with_the_official_client() {
    let model = ModelSlot::new(ModelStatus::Ready(crate::smollm2::engine().clone()));
    let s = TestServer::start_full(Backend::Sqlite, Default::default(), model).await;
    let t = s.tenant("py").await;
    let r = crate::common::run_python_client("tools_client.py", &s.base, &t.key).await;
    for (name, tool) in [("required", "get_weather"), ("named", "get_time")] {
        let c = &r[name];
        assert_eq!(c["errors"], json!([]), "{name}: {c}");
        assert_eq!(c["whole_finish"], "tool_calls", "{name}: {c}");
        assert_eq!(c["streamed_finish"], "tool_calls", "{name}: {c}");
        assert_eq!(c["whole_content"], Value::Null, "{name}: {c}");
        let calls = c["whole_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{name}: {c}");
        assert_eq!(calls[0]["name"], tool, "{name}: {c}");
        // Greedy: the streamed deltas rebuild the same call (ids are per reply).
        let strip = |v: &Value| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|c| (c["name"].clone(), c["arguments"].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(&c["streamed_calls"]),
            strip(&c["whole_calls"]),
            "{name}"
        );
    }
    // The model's own answer: Paris, from the question.
    let args: Value = serde_json::from_str(
        r["required"]["whole_calls"][0]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args["city"], "Paris", "{args}");
    // Fed the result, it answers from it.
    let f = &r["final"];
    assert_eq!(f["finish"], "stop", "{f}");
    assert_eq!(f["tool_calls"], 0, "{f}");
    assert!(
        f["content"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("sunny"),
        "{f}"
    );
    s.stop().await;
}
