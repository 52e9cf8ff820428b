//! Structured output on the OpenAI API: `response_format` constrains decoding, so even the
//! tiny model's random weights, sampled at temperature 1, give replies that parse and match
//! their schema — whole and streamed, one at a time and batched — and schemas that cannot be
//! enforced are refused by name. With the real SmolLM2, the official `openai` package asks
//! and Python's `jsonschema` checks the replies (tests/clients/structured_client.py).

use serde_json::{json, Value};

use confab::engine::{ModelSlot, ModelStatus};

use crate::common::{Backend, TestServer};
use crate::ws::{tiny_model_batched, Ws};

const MODEL: &str = "tiny-llama";

/// The schemas every reply is checked against: nested objects, arrays, enums, required
/// fields, numbers with bounds; strings and arrays bounded so a reply ends within its tokens.
fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "ok": {"type": "boolean"}},
            "required": ["colour", "tags", "ok"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "point": {"type": "object", "properties": {
                "x": {"type": "number", "minimum": -1, "maximum": 1},
                "y": {"type": "integer", "minimum": 5, "maximum": 9}},
                "required": ["x", "y"], "additionalProperties": false}},
            "required": ["point"], "additionalProperties": false}),
    ]
}

/// Whether `v` matches `schema`, for the keywords [`schemas`] uses; `Err` says where not.
pub(crate) fn check(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{at}: {why} ({v})"));
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            return fail("not in the enum");
        }
    }
    let num = |k: &str| schema[k].as_f64();
    match schema["type"].as_str() {
        Some("object") => {
            let Some(o) = v.as_object() else {
                return fail("not an object");
            };
            let props = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for r in schema["required"].as_array().into_iter().flatten() {
                if !o.contains_key(r.as_str().unwrap()) {
                    return fail(&format!("{r} missing"));
                }
            }
            for (k, x) in o {
                match props.get(k) {
                    Some(s) => check(s, x, &format!("{at}.{k}"))?,
                    None if schema["additionalProperties"] == false => {
                        return fail(&format!("{k} not allowed"))
                    }
                    None => {}
                }
            }
        }
        Some("array") => {
            let Some(a) = v.as_array() else {
                return fail("not an array");
            };
            let n = a.len() as f64;
            if num("minItems").is_some_and(|m| n < m) || num("maxItems").is_some_and(|m| n > m) {
                return fail("wrong number of items");
            }
            for (i, x) in a.iter().enumerate() {
                check(&schema["items"], x, &format!("{at}[{i}]"))?;
            }
        }
        Some("string") => {
            let Some(s) = v.as_str() else {
                return fail("not a string");
            };
            if num("maxLength").is_some_and(|m| s.chars().count() as f64 > m) {
                return fail("too long");
            }
        }
        Some(t @ ("integer" | "number")) => {
            let Some(x) = v.as_f64() else {
                return fail("not a number");
            };
            if t == "integer" && !(v.is_i64() || v.is_u64()) {
                return fail("not an integer");
            }
            if num("minimum").is_some_and(|m| x < m) || num("maximum").is_some_and(|m| x > m) {
                return fail("out of bounds");
            }
        }
        Some("boolean") if !v.is_boolean() => return fail("not a boolean"),
        _ => {}
    }
    Ok(())
}

fn request(schema: &Value, seed: u64, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 200,
        "temperature": 1.0,
        "seed": seed,
        "stream": stream,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": true}},
    })
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

/// A whole reply's text and finish reason.
async fn whole(s: &TestServer, key: &str, body: &Value) -> (String, String) {
    let r = post(s, key, body).await;
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    let c = &v["choices"][0];
    (
        c["message"]["content"].as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// A streamed reply's deltas joined, and its finish reason.
async fn streamed(s: &TestServer, key: &str, body: &Value) -> (String, String) {
    let r = post(s, key, body).await;
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    let (mut content, mut finish) = (String::new(), String::new());
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let c = &chunk["choices"][0];
        content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (content, finish)
}

fn valid(schema: &Value, (text, finish): &(String, String)) {
    assert_eq!(finish, "stop", "the grammar ends the reply: {text}");
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    check(schema, &v, "$").unwrap();
}

async fn replies_match_their_schema(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model_batched(None, 4)).await;
    let t = s.tenant("acme").await;
    for (i, schema) in schemas().iter().enumerate() {
        for seed in 0..3u64 {
            let seed = seed + 10 * i as u64;
            let w = whole(&s, &t.key, &request(schema, seed, false)).await;
            valid(schema, &w);
            // The same seed streamed: the same reply, in pieces.
            let st = streamed(&s, &t.key, &request(schema, seed, true)).await;
            assert_eq!(st, w, "seed {seed}");
        }
    }
    // References, constants, alternatives and patterns (checked by hand).
    let refs = json!({
        "$defs": {"tag": {"type": "string", "pattern": "^[a-z]{2,4}$"}},
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "label": {"$ref": "#/$defs/tag"},
            "v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}
        },
        "required": ["kind", "label", "v"],
        "additionalProperties": false
    });
    for seed in 0..4 {
        let (text, finish) = whole(&s, &t.key, &request(&refs, seed, false)).await;
        assert_eq!(finish, "stop", "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
        assert_eq!(v["kind"], "point", "{v}");
        let label = v["label"].as_str().unwrap();
        assert!(
            (2..=4).contains(&label.len()) && label.bytes().all(|b| b.is_ascii_lowercase()),
            "{v}"
        );
        assert!(
            v["v"].is_boolean() || v["v"].as_u64().is_some_and(|n| n <= 9),
            "{v}"
        );
    }
    // Any JSON object.
    let any = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 200, "temperature": 0, "response_format": {"type": "json_object"}});
    let (text, finish) = whole(&s, &t.key, &any).await;
    assert_eq!(finish, "stop");
    assert!(
        serde_json::from_str::<Value>(&text).unwrap().is_object(),
        "{text}"
    );
    s.stop().await;
}

async fn batched_replies_keep_their_own_grammar(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model_batched(None, 4)).await;
    let t = s.tenant("acme").await;
    let schemas = schemas();
    // Eight at once over a batch of four: each with its own schema (or none), side by side.
    let runs = (0..8u64).map(|i| {
        let s = &s;
        let key = t.key.clone();
        let schema = schemas.get(i as usize % 4).cloned();
        async move {
            let body = match &schema {
                Some(sc) => request(sc, 100 + i, i % 2 == 0),
                None => json!({"model": MODEL, "max_tokens": 20, "temperature": 1.0,
                    "seed": i, "messages": [{"role": "user", "content": "hi"}]}),
            };
            let got = if i % 2 == 0 {
                streamed(s, &key, &body).await
            } else {
                whole(s, &key, &body).await
            };
            (schema, got)
        }
    });
    for (schema, got) in futures_util::future::join_all(runs).await {
        match schema {
            Some(sc) => valid(&sc, &got),
            None => assert!(!got.0.is_empty()),
        }
    }
    s.stop().await;
}

async fn unenforceable_formats_are_refused(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model_batched(None, 1)).await;
    let t = s.tenant("acme").await;
    let with = |rf: Value| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "response_format": rf})
    };
    for (rf, param, needle) in [
        (
            json!({"type": "xml"}),
            "response_format.type",
            "json_schema",
        ),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
            "required",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}),
            "response_format.json_schema.name",
            "characters",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}),
            "response_format.json_schema.schema",
            "object",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "n",
                "schema": {"type": "object", "if": {"type": "object"}}}}),
            "response_format",
            "if",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "n",
                "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}),
            "response_format",
            "",
        ),
    ] {
        let r = post(&s, &t.key, &with(rf.clone())).await;
        assert_eq!(r.status().as_u16(), 400, "{rf}");
        let v: Value = r.json().await.unwrap();
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert_eq!(e["param"], param, "{v}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{v}");
    }
    // Plain text is still text.
    let r = post(&s, &t.key, &with(json!({"type": "text"}))).await;
    assert_eq!(r.status().as_u16(), 200);
    s.stop().await;
}

/// A chat whose config carries a `response_format`: every WebSocket reply parses and
/// matches, `message_stream_ended` says it was constrained, and the format is checked when
/// it is set and can be cleared.
async fn chat_replies_follow_the_chats_format(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model_batched(None, 2)).await;
    let t = s.tenant("acme").await;
    let schema = schemas().remove(1);
    let chat = s
        .create_chat(
            &t.key,
            json!({"user_id": "u", "config": {"temperature": 1.0, "max_tokens": 200, "seed": 3,
                "response_format": {"type": "json_schema",
                    "json_schema": {"name": "answer", "schema": schema}}}}),
        )
        .await;
    let id = chat["id"].as_str().unwrap().to_string();
    assert_eq!(
        chat["config"]["response_format"]["type"], "json_schema",
        "{chat}"
    );
    assert_eq!(
        chat["config"]["response_format"]["json_schema"]["schema"],
        schema
    );
    let mut ws = Ws::connect(&s, &t.key, "u", &id).await;
    ws.until("connection_established").await;
    for turn in 0..3 {
        ws.send(json!({"type": "message", "content": format!("turn {turn}")}))
            .await;
        let ended = ws.until("message_stream_ended").await;
        assert_eq!(ended["finish_reason"], "stop", "{ended}");
        assert_eq!(ended["response_format"], "json_schema", "{ended}");
        let text = ended["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        check(&schema, &v, "$").unwrap();
    }
    // Checked when set; cleared with null.
    let (st, v) = s
        .patch(
            &format!("/api/v1/chats/{id}"),
            &t.key,
            json!({"config": {"response_format": {"type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "object", "if": {}}}}}}),
        )
        .await;
    assert_eq!(st.as_u16(), 400, "{v}");
    assert_eq!(
        v["error"]["details"]["field"], "config.response_format",
        "{v}"
    );
    for bad in [
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
        json!({"type": "xml"}),
    ] {
        let (st, v) = s
            .patch(
                &format!("/api/v1/chats/{id}"),
                &t.key,
                json!({"config": {"response_format": bad}}),
            )
            .await;
        assert_eq!(st.as_u16(), 400, "{v}");
        assert_eq!(v["error"]["code"], "validation_error", "{v}");
    }
    let (st, v) = s
        .patch(
            &format!("/api/v1/chats/{id}"),
            &t.key,
            json!({"config": {"response_format": null, "max_tokens": 5}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert!(v["config"].get("response_format").is_none(), "{v}");
    ws.send(json!({"type": "message", "content": "free"})).await;
    let ended = ws.until("message_stream_ended").await;
    assert!(ended.get("response_format").is_none(), "{ended}");
    s.stop().await;
}

/// A GBNF grammar (llama-server's `grammar` field) over both APIs.
const GBNF: &str = r#"# an answer, a count and a short list
root ::= answer ", " count "\n" item{1,3}
answer ::= "yes" | "no"
count ::= [1-9] [0-9]{0,2}
item ::= "- " [a-z]{1,8} "\n"
"#;

/// The same language as [`GBNF`], to check replies with.
const GBNF_REGEX: &str = r"\A(yes|no), [1-9][0-9]{0,2}\n(- [a-z]{1,8}\n){1,3}\z";

/// Replies held to a GBNF grammar: chat completions (whole and streamed, the same reply for
/// the same seed) and text completions; grammars that are not GBNF, or that clash with
/// another constraint, refused by name.
async fn gbnf_grammars_hold_replies(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model_batched(None, 2)).await;
    let t = s.tenant("acme").await;
    let language = regex::Regex::new(GBNF_REGEX).unwrap();
    let chat = |seed: u64, stream: bool| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "List."}],
            "max_tokens": 100, "temperature": 1.0, "seed": seed, "stream": stream,
            "grammar": GBNF})
    };
    for seed in 0..4 {
        let w = whole(&s, &t.key, &chat(seed, false)).await;
        assert!(language.is_match(&w.0), "seed {seed}: {:?}", w.0);
        assert_eq!(w.1, "stop", "the grammar ends the reply: {:?}", w.0);
        assert_eq!(streamed(&s, &t.key, &chat(seed, true)).await, w);
    }
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .bearer_auth(&t.key)
        .json(&json!({"model": MODEL, "prompt": "Once", "max_tokens": 100,
            "temperature": 1.0, "seed": 7, "grammar": GBNF}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(language.is_match(text), "{text:?}");
    // An empty grammar is none, as llama-server reads it.
    let mut free = chat(1, false);
    free["grammar"] = json!("");
    free["max_tokens"] = json!(5);
    assert_eq!(post(&s, &t.key, &free).await.status().as_u16(), 200);

    let tool = json!([{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object"}}}]);
    for (change, param, needle) in [
        (
            json!({"grammar": "root ::= \"a\"\nitem ::= [a-"}),
            "grammar",
            "is not a valid GBNF grammar: line 2, column 10",
        ),
        (
            json!({"grammar": "root ::= item"}),
            "grammar",
            "refers to \"item\", which is not defined",
        ),
        (
            json!({"grammar": "root: \"lark is not gbnf\""}),
            "grammar",
            "expected '::='",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            "grammar",
            "cannot be combined with response_format",
        ),
        (
            json!({"tools": tool}),
            "grammar",
            "cannot be combined with tools",
        ),
    ] {
        let mut body = chat(0, false);
        for (k, v) in change.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = post(&s, &t.key, &body).await;
        assert_eq!(r.status().as_u16(), 400, "{change}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{change}: {message}");
    }
    s.stop().await;
}

crate::backend_tests!(
    gbnf_grammars_hold_replies,
    chat_replies_follow_the_chats_format,
    replies_match_their_schema,
    batched_replies_keep_their_own_grammar,
    unenforceable_formats_are_refused,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_replies_validate_with_the_official_clients() {
    let model = ModelSlot::new(ModelStatus::Ready(crate::smollm2::engine().clone()));
    let s = TestServer::start_full(Backend::Sqlite, Default::default(), model).await;
    let t = s.tenant("py").await;
    let r = crate::common::run_python_client("structured_client.py", &s.base, &t.key).await;
    for (name, case) in r.as_object().unwrap() {
        assert_eq!(case["errors"], json!([]), "{name}: {case}");
        assert_eq!(case["whole_finish"], "stop", "{name}: {case}");
        assert_eq!(
            case["streamed"], case["whole"],
            "{name}: greedy, the same reply"
        );
        assert_eq!(case["streamed_finish"], "stop", "{name}");
    }
    assert_eq!(r.as_object().unwrap().len(), 3);
    // The model's answer, not just any valid JSON: the constraint leaves it its knowledge.
    let city: Value = serde_json::from_str(r["city"]["whole"].as_str().unwrap()).unwrap();
    assert_eq!(city["city"], "Paris", "{city}");
    s.stop().await;
}
