//! The OpenAI-compatible API against the real server and the tiny generated model: the
//! official `openai` Python package as the client (tests/clients/openai_client.py), the SSE
//! wire format as bytes, OpenAI-shaped errors, and the queues and quotas it shares with
//! live chat.

use std::time::{Duration, Instant};

use confab::chat::ChatSettings;
use confab::ServerSettings;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::backend_tests;
use crate::common::{Backend, TestServer};
use crate::ws::tiny_model;

const MODEL: &str = "tiny-llama";

async fn server(b: Backend, settings: ServerSettings, pace: Option<Duration>) -> TestServer {
    TestServer::start_full(b, settings, tiny_model(pace)).await
}

fn chat_settings(chat: ChatSettings) -> ServerSettings {
    ServerSettings {
        chat,
        ..Default::default()
    }
}

/// Sends a chat completion with a bearer key; returns the raw response.
async fn complete(s: &TestServer, key: &str, body: Value) -> reqwest::Response {
    s.http
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request")
}

fn body(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// Checks an error body has OpenAI's shape and returns it.
fn openai_error(status: StatusCode, v: &Value, want_status: u16, code: &str) -> Value {
    assert_eq!(status.as_u16(), want_status, "{v}");
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(
        e.get("param").is_some(),
        "param must be present (maybe null): {v}"
    );
    e.clone()
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let v = r.json().await.expect("JSON body");
    (status, v)
}

/// `GET path` with a bearer key; status and JSON body.
async fn get_v1(s: &TestServer, key: &str, path: &str) -> (StatusCode, Value) {
    let r = s.http.get(format!("{}{path}", s.base)).bearer_auth(key);
    json_of(r.send().await.expect("request")).await
}

/// Reads an SSE body to its end: the `data:` payloads, in order.
async fn sse_data(r: reqwest::Response) -> Vec<String> {
    let text = tokio::time::timeout(Duration::from_secs(30), r.text())
        .await
        .expect("stream ends")
        .expect("body");
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_package_chats_streamed_and_whole() {
    let s = server(Backend::Sqlite, ServerSettings::default(), None).await;
    let t = s.tenant("py").await;
    let r = crate::common::run_python_client("openai_client.py", &s.base, &t.key).await;

    assert_eq!(r["models"], json!([MODEL]));
    let whole = &r["whole"];
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], MODEL);
    assert_eq!(whole["role"], "assistant");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let u = &whole["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && (1..=12).contains(&c), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);
    assert!(["stop", "length"].contains(&whole["finish_reason"].as_str().unwrap()));

    // Greedy with the same input: the stream is the same reply, in pieces.
    let streamed = &r["streamed"];
    assert_eq!(streamed["content"], whole["content"], "{r}");
    assert_eq!(streamed["finish_reason"], whole["finish_reason"]);
    assert_eq!(streamed["usage"], whole["usage"]);
    assert_eq!(streamed["ids"], 1, "one id for every chunk");
    if c > 1 && whole["finish_reason"] == "length" {
        assert!(streamed["pieces"].as_array().unwrap().len() > 1, "{r}");
    }

    // /v1/completions through the same package.
    let text = &r["text"];
    assert_eq!(text["object"], "text_completion", "{text}");
    assert!(text["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(
        text["streamed"], text["text"],
        "greedy: the same text streamed"
    );
    assert_eq!(text["streamed_finish"], text["finish_reason"]);
    let n = text["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&n), "{text}");
    let tokens = text["tokens"].as_array().unwrap();
    assert_eq!(tokens.len() as u64, n, "{text}");
    assert!(text["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_object().unwrap().len() <= 2));
    let offsets: Vec<u64> = text["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{text}");

    assert_eq!(r["errors"]["model"], json!([404, "model_not_found"]));
    assert_eq!(r["errors"]["key"], json!([401, "invalid_api_key"]));
    assert_eq!(
        r["errors"]["temperature"],
        json!([400, "validation_error", "temperature"])
    );

    // Both completions count in the tenant's usage, under the request's `user`.
    let (st, usage) = s.get("/api/v1/usage?user_id=py-user", &t.key).await;
    assert_eq!(st, StatusCode::OK, "{usage}");
    // (The completions above name no user.)
    assert_eq!(usage["totals"]["prompt_tokens"], 2 * p);
    assert_eq!(usage["totals"]["completion_tokens"], 2 * c);
    s.stop().await;
}

async fn sse_format_and_both_key_headers(b: Backend) {
    let s = server(b, ServerSettings::default(), None).await;
    let t = s.tenant("sse").await;

    let r = complete(&s, &t.key, body(8, true)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let data = sse_data(r).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert!(chunks.len() >= 2, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert_eq!(c["model"], MODEL);
    }
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert!(last.get("usage").is_none(), "usage only when asked: {last}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();

    // The same request, whole, with the key in X-API-Key: the same (greedy) text.
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .header("X-API-Key", &t.key)
        .json(&body(8, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-ratelimit-limit"], "100");
    let (st, v) = json_of(r).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(v["choices"][0]["index"], 0);

    let (st, v) = get_v1(&s, &t.key, &format!("/v1/models/{MODEL}")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "model");
    assert_eq!(v["owned_by"], "confab");
    // Which file is loaded: the tiny test model is a llama of F32 tensors.
    assert_eq!(v["meta"]["architecture"], "llama", "{v}");
    assert!(
        !v["meta"]["quantization"].as_str().unwrap().is_empty(),
        "{v}"
    );
    assert!(v["meta"]["parameters"].as_u64().unwrap() > 0, "{v}");
    assert!(v["meta"]["context_length"].as_u64().unwrap() > 0, "{v}");
    let (st, r) = s.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["model_info"], v["meta"], "{r}");
    s.stop().await;
}

async fn errors_have_openai_shape(b: Backend) {
    let s = server(b, ServerSettings::default(), None).await;
    let t = s.tenant("errs").await;
    let url = format!("{}/v1/chat/completions", s.base);

    let (st, v) = json_of(
        s.http
            .post(&url)
            .json(&body(4, false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let e = openai_error(st, &v, 401, "missing_api_key");
    assert_eq!(e["type"], "authentication_error");
    assert!(e["message"].as_str().unwrap().contains("Bearer"));

    let r = s
        .http
        .post(&url)
        .bearer_auth("cfk_nope")
        .json(&body(4, false))
        .send()
        .await;
    let (st, v) = json_of(r.unwrap()).await;
    openai_error(st, &v, 401, "invalid_api_key");

    let r = s
        .http
        .post(&url)
        .bearer_auth(&t.key)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await;
    let (st, v) = json_of(r.unwrap()).await;
    openai_error(st, &v, 400, "invalid_json");

    let mut bad = body(4, false);
    bad["messages"][0]["content"] = json!(7);
    let (st, v) = json_of(complete(&s, &t.key, bad).await).await;
    let e = openai_error(st, &v, 400, "validation_error");
    assert_eq!(e["param"], "messages[0].content");
    assert_eq!(e["type"], "invalid_request_error");

    let mut bad = body(4, false);
    bad["max_tokens"] = json!(100_000);
    let (st, v) = json_of(complete(&s, &t.key, bad).await).await;
    assert_eq!(
        openai_error(st, &v, 400, "validation_error")["param"],
        "max_tokens"
    );

    let mut bad = body(4, false);
    bad["model"] = json!("gpt-4o");
    let (st, v) = json_of(complete(&s, &t.key, bad).await).await;
    let e = openai_error(st, &v, 404, "model_not_found");
    assert_eq!(e["details"]["available"], json!([MODEL]));

    // Longer than the context (256 tokens): refused before anything streams.
    let mut long = body(16, true);
    long["messages"][0]["content"] = json!("word ".repeat(400));
    let (st, v) = json_of(complete(&s, &t.key, long).await).await;
    let e = openai_error(st, &v, 400, "context_length_exceeded");
    assert_eq!(e["details"]["context_length"], 256);

    let (st, v) = get_v1(&s, &t.key, "/v1/nothing-here").await;
    openai_error(st, &v, 404, "not_found");
    s.stop().await;
}

/// Waits until the tenant has `n` requests waiting (the queue-depth gauge says so).
async fn until_queued(s: &TestServer, tenant: &crate::common::Tenant, n: usize) {
    let gauge = format!("confab_queue_depth{{tenant=\"{}\"}} {n}", tenant.id);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s
            .http
            .get(format!("{}/metrics", s.base))
            .send()
            .await
            .unwrap();
        if r.text().await.unwrap().contains(&gauge) {
            return;
        }
        assert!(Instant::now() < deadline, "never queued: {gauge}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request sent in the background: its status and how long it took.
fn in_background(
    s: &TestServer,
    key: &str,
    body: Value,
) -> tokio::task::JoinHandle<(reqwest::Result<StatusCode>, Duration)> {
    let http = s.http.clone();
    let url = format!("{}/v1/chat/completions", s.base);
    let key = key.to_string();
    tokio::spawn(async move {
        let started = Instant::now();
        let r = http.post(url).bearer_auth(key).json(&body).send().await;
        (r.map(|r| r.status()), started.elapsed())
    })
}

/// One slot, one queue place per tenant, two server-wide: the OpenAI requests wait in the
/// chat queues, are refused with 429/503 + Retry-After past them, and a client that leaves
/// frees its slot at once.
async fn completions_share_the_chat_queues(b: Backend) {
    let chat = ChatSettings {
        queue_per_tenant: 1,
        max_waiting_total: 2,
        ..Default::default()
    };
    let s = server(b, chat_settings(chat), Some(Duration::from_millis(20))).await;
    let a = s.tenant("a").await;
    let b2 = s.tenant("b").await;
    let c = s.tenant("c").await;

    // A long streamed reply holds the slot; read its first chunk so it surely runs.
    let running = complete(&s, &a.key, body(200, true)).await;
    assert_eq!(running.status(), StatusCode::OK);
    let mut stream = running.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))));

    // The tenant's next request waits; the one after finds its queue full.
    let a_waiting = in_background(&s, &a.key, body(2, false));
    until_queued(&s, &a, 1).await;
    let r = complete(&s, &a.key, body(2, false)).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let (st, v) = json_of(r).await;
    assert_eq!(
        openai_error(st, &v, 429, "queue_full")["type"],
        "rate_limit_error"
    );

    // Another tenant's request waits too; then the server-wide bound is reached.
    let b_waiting = in_background(&s, &b2.key, body(2, false));
    until_queued(&s, &b2, 1).await;
    let r = complete(&s, &c.key, body(2, false)).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let (st, v) = json_of(r).await;
    assert_eq!(
        openai_error(st, &v, 503, "server_busy")["type"],
        "server_error"
    );

    // The streaming client goes away: its generation stops and the waiting ones run.
    let left = Instant::now();
    drop(stream);
    for waiting in [a_waiting, b_waiting] {
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("a waiting request is served")
            .unwrap();
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert!(
        left.elapsed() < Duration::from_secs(3),
        "a 200-token reply at 20 ms a token takes 4 s; the slot must be freed on disconnect"
    );
    s.stop().await;
}

async fn completions_count_against_the_request_quota(b: Backend) {
    let settings = ServerSettings {
        quotas: confab::api::quota::QuotaDefaults {
            requests_per_minute: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = server(b, settings, None).await;
    let t = s.tenant("q").await;
    for _ in 0..2 {
        assert_eq!(
            complete(&s, &t.key, body(1, false)).await.status(),
            StatusCode::OK
        );
    }
    let r = complete(&s, &t.key, body(1, false)).await;
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let (st, v) = json_of(r).await;
    assert_eq!(
        openai_error(st, &v, 429, "rate_limited")["type"],
        "rate_limit_error"
    );
    s.stop().await;
}

backend_tests!(
    sse_format_and_both_key_headers,
    errors_have_openai_shape,
    completions_share_the_chat_queues,
    completions_count_against_the_request_quota,
);

/// `logprobs`/`top_logprobs`: one entry per generated token, whole and streamed alike; greedy
/// picks the most likely token, so each token is its own first alternative. Presence and
/// frequency penalties are taken (and bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_penalties() {
    let s = server(Backend::Sqlite, Default::default(), None).await;
    let t = s.tenant("acme").await;
    let mut b = body(12, false);
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(3);
    let (st, v) = json_of(complete(&s, &t.key, b.clone()).await).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let tokens = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(tokens.len() as u64, v["usage"]["completion_tokens"], "{v}");
    for tok in tokens {
        let lp = tok["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{tok}");
        let top = tok["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{tok}");
        assert!(top
            .windows(2)
            .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        assert_eq!(
            top[0]["token"], tok["token"],
            "greedy takes the most likely: {tok}"
        );
        assert_eq!(top[0]["logprob"], tok["logprob"]);
        assert_eq!(
            tok["bytes"],
            json!(tok["token"].as_str().unwrap().as_bytes()),
            "{tok}"
        );
    }
    // Streamed: the chunks carry the same entries.
    b["stream"] = json!(true);
    let mut streamed = Vec::new();
    for data in sse_data(complete(&s, &t.key, b.clone()).await).await {
        if data == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(&data).unwrap();
        if let Some(lp) = c["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(lp.iter().cloned());
        }
    }
    assert_eq!(&streamed, tokens);
    // Not asked: null.
    let (_, v) = json_of(complete(&s, &t.key, body(4, false)).await).await;
    assert_eq!(v["choices"][0]["logprobs"], Value::Null, "{v}");

    // Penalties change a greedy reply; out of range is refused by name.
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (_, plain) = json_of(complete(&s, &t.key, body(40, false)).await).await;
    let mut pen = body(40, false);
    pen["frequency_penalty"] = json!(2.0);
    pen["presence_penalty"] = json!(1.0);
    let (st, penalised) = json_of(complete(&s, &t.key, pen).await).await;
    assert_eq!(st, StatusCode::OK, "{penalised}");
    assert_ne!(text(&plain), text(&penalised));
    for (k, v) in [
        ("presence_penalty", json!(2.5)),
        ("frequency_penalty", json!(-3)),
        ("top_logprobs", json!(21)),
    ] {
        let mut b = body(4, false);
        b["logprobs"] = json!(true);
        b[k] = v;
        let (st, v) = json_of(complete(&s, &t.key, b).await).await;
        assert_eq!(openai_error(st, &v, 400, "validation_error")["param"], k);
    }
    s.stop().await;
}

/// `/v1/completions`: the prompt as written (no chat template: fewer tokens than the same
/// text as a chat message), the template's own markup read as special tokens, streamed and
/// whole alike; what it cannot do is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completions() {
    let s = server(Backend::Sqlite, Default::default(), None).await;
    let t = s.tenant("acme").await;
    let post = |body: Value| {
        let s = &s;
        let key = t.key.clone();
        async move {
            let r = s
                .http
                .post(format!("{}/v1/completions", s.base))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            r
        }
    };
    let body = json!({"model": MODEL, "prompt": "the cat", "max_tokens": 6, "temperature": 0});
    let (st, v) = json_of(post(body.clone()).await).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    // The byte-level tiny vocabulary: "the cat" is at most 7 tokens, and no template.
    assert!(prompt_tokens <= 7, "{v}");
    let (_, chat) = json_of(
        complete(
            &s,
            &t.key,
            json!({"model": MODEL, "max_tokens": 1,
        "messages": [{"role": "user", "content": "the cat"}]}),
        )
        .await,
    )
    .await;
    assert!(chat["usage"]["prompt_tokens"].as_u64().unwrap() > prompt_tokens + 5);
    // Special-token text is the special token: one token, not eleven bytes.
    let (_, special) =
        json_of(post(json!({"model": MODEL, "prompt": "<|im_start|>", "max_tokens": 1})).await)
            .await;
    assert_eq!(special["usage"]["prompt_tokens"], 1, "{special}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let data = sse_data(post(streamed).await).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks.last().unwrap()["usage"], v["usage"]);

    for (k, val, param) in [
        ("prompt", json!([1, 2, 3]), "prompt"),
        ("prompt", json!(["a", "b"]), "prompt"),
        ("prompt", json!(""), "prompt"),
        ("echo", json!(true), "echo"),
        ("suffix", json!("end"), "suffix"),
        ("best_of", json!(3), "best_of"),
        ("logprobs", json!(6), "logprobs"),
        ("n", json!(2), "n"),
        ("temperature", json!(3), "temperature"),
    ] {
        let mut b = body.clone();
        b[k] = val;
        let (st, v) = json_of(post(b).await).await;
        assert_eq!(
            openai_error(st, &v, 400, "validation_error")["param"],
            param,
            "{k}"
        );
    }
    let (st, v) = json_of(post(json!({"model": MODEL, "prompt": "x".repeat(300)})).await).await;
    assert_eq!(st.as_u16(), 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    s.stop().await;
}
