//! Live chat over `/ws/chat` with a real WebSocket client against the real server, on
//! SQLite and PostgreSQL, with the tiny generated model (paced where a reply must last).

use std::sync::OnceLock;
use std::time::Duration;

use confab::api::quota::QuotaDefaults;
use confab::chat::ChatSettings;
use confab::engine::{self, EngineOptions, ModelSlot, ModelStatus};
use confab::ServerSettings;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::backend_tests;
use crate::common::{Backend, TestServer};

/// Bound on every wait for an event.
const WAIT: Duration = Duration::from_secs(20);

fn tiny_path() -> &'static std::path::Path {
    static P: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = crate::tiny::write(dir.path(), "llama");
        (dir, path)
    })
    .1
}

/// The tiny model, generating at most one token per `pace` (so a reply can be caught
/// mid-stream), one reply at a time.
pub fn tiny_model(pace: Option<Duration>) -> ModelSlot {
    tiny_model_batched(pace, 1)
}

/// The tiny model generating up to `max_batch` replies together (the chat service's slots).
pub fn tiny_model_batched(pace: Option<Duration>, max_batch: usize) -> ModelSlot {
    let opts = EngineOptions {
        min_token_interval: pace,
        threads: Some(1),
        max_batch,
        ..Default::default()
    };
    let handle = engine::load(tiny_path().to_path_buf(), opts).expect("load tiny model");
    ModelSlot::new(ModelStatus::Ready(handle))
}

fn settings(chat: ChatSettings) -> ServerSettings {
    ServerSettings {
        chat,
        ..Default::default()
    }
}

async fn server(b: Backend, chat: ChatSettings, pace: Option<Duration>) -> TestServer {
    TestServer::start_full(b, settings(chat), tiny_model(pace)).await
}

/// A chat with greedy decoding and `max_tokens`.
async fn chat(s: &TestServer, key: &str, user: &str, max_tokens: u32) -> String {
    let c = s
        .create_chat(
            key,
            json!({"user_id": user, "config": {"temperature": 0, "max_tokens": max_tokens}}),
        )
        .await;
    c["id"].as_str().unwrap().to_string()
}

pub struct Ws {
    inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// A close frame: code and reason.
pub type Closed = (u16, String);

impl Ws {
    pub async fn connect_query(s: &TestServer, query: &str) -> Ws {
        let url = format!("{}/ws/chat?{query}", s.base.replacen("http", "ws", 1));
        let (inner, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        Ws { inner }
    }

    pub async fn connect(s: &TestServer, key: &str, user: &str, chat: &str) -> Ws {
        Self::connect_query(s, &format!("api_key={key}&user_id={user}&chat_id={chat}")).await
    }

    async fn connect_headers(s: &TestServer, headers: &[(&'static str, &str)]) -> Ws {
        let url = format!("{}/ws/chat", s.base.replacen("http", "ws", 1));
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(*k, v.parse().unwrap());
        }
        let (inner, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        Ws { inner }
    }

    pub async fn send(&mut self, v: Value) {
        self.inner.send(Message::text(v.to_string())).await.unwrap();
    }

    async fn send_raw(&mut self, m: Message) {
        self.inner.send(m).await.unwrap();
    }

    /// The next event, or the close frame.
    pub async fn recv(&mut self) -> Result<Value, Closed> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("a frame in time");
            match frame {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("JSON event");
                    check_envelope(&v);
                    return Ok(v);
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(c.map_or((1005, String::new()), |c| {
                        (u16::from(c.code), c.reason.to_string())
                    }))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err((1006, e.to_string())),
                None => return Err((1006, "ended".into())),
            }
        }
    }

    pub async fn event(&mut self) -> Value {
        self.recv().await.expect("an event, not a close")
    }

    /// Skips events until one of `kind` (bounded by the number of frames and by time).
    pub async fn until(&mut self, kind: &str) -> Value {
        for _ in 0..10_000 {
            let e = self.event().await;
            if e["event_type"] == kind {
                return e;
            }
        }
        panic!("no {kind} event");
    }

    /// Expects an error event with `code`; returns it.
    async fn error(&mut self, code: &str) -> Value {
        let e = self.event().await;
        assert_eq!(e["event_type"], "error", "{e}");
        assert_eq!(e["code"], code, "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["details"].is_object(), "{e}");
        e
    }

    /// A refused connection: one error event, then the close frame.
    pub async fn refused(&mut self, code: &str, close: u16) {
        self.error(code).await;
        let c = self.recv().await.expect_err("closed after the error");
        assert_eq!(c, (close, code.to_string()));
    }

    pub async fn close(mut self) {
        let _ = self.inner.close(None).await;
    }
}

/// Every event has `event_type` and a millisecond UTC RFC 3339 timestamp.
fn check_envelope(v: &Value) {
    assert!(v["event_type"].is_string(), "{v}");
    let ts = v["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("timestamp: {v}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok() && ts.ends_with('Z') && ts.len() == 24,
        "timestamp {ts}"
    );
}

/// Reads a whole reply after `message_received`: returns (started, tokens, ended).
async fn read_reply(ws: &mut Ws) -> (Value, Vec<Value>, Value) {
    let started = ws.until("message_stream_started").await;
    let mut tokens = Vec::new();
    loop {
        let e = ws.event().await;
        match e["event_type"].as_str() {
            Some("message_stream_token") => tokens.push(e),
            Some("message_stream_ended") => return (started, tokens, e),
            _ => panic!("unexpected during a reply: {e}"),
        }
    }
}

async fn messages(s: &TestServer, key: &str, chat: &str) -> Vec<Value> {
    let (st, v) = s
        .get(&format!("/api/v1/chats/{chat}/messages?limit=100"), key)
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    v["messages"].as_array().unwrap().clone()
}

async fn a_reply_streams_and_both_sides_are_saved(b: Backend) {
    let s = server(b, ChatSettings::default(), None).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 12).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    let hello = ws.event().await;
    assert_eq!(hello["event_type"], "connection_established");
    assert_eq!(hello["user_id"], "alice");
    assert_eq!(hello["chat_id"], chat_id.as_str());
    assert_eq!(hello["tenant_id"], t.id.to_string());

    ws.send(json!({"content": "Hello there", "metadata": {"source": "test", "n": [1, 2]}}))
        .await;
    let received = ws.event().await;
    assert_eq!(received["event_type"], "message_received", "{received}");
    assert_eq!(received["chat_id"], chat_id.as_str());
    let user_msg = received["message_id"].as_str().unwrap().to_string();
    let (started, tokens, ended) = read_reply(&mut ws).await;
    assert_eq!(started["chat_id"], chat_id.as_str());
    assert_eq!(started["reply_to"], user_msg.as_str());
    let reply_id = started["message_id"].as_str().unwrap();
    let mut text = String::new();
    for (i, tok) in tokens.iter().enumerate() {
        assert_eq!(tok["message_id"], reply_id);
        assert_eq!(tok["index"], i, "{tok}");
        text.push_str(tok["token"].as_str().unwrap());
    }
    assert!(!text.is_empty());
    assert_eq!(ended["message_id"], reply_id);
    assert_eq!(ended["content"], text.as_str());
    assert_eq!(ended["finish_reason"], "length");
    assert_eq!(ended["usage"]["completion_tokens"], 12);
    assert!(ended["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
    let timings = &ended["timings"];
    assert!(timings["queue_ms"].is_u64(), "{ended}");
    assert!(timings["time_to_first_token_ms"].is_u64(), "{ended}");
    assert!(
        timings["tokens_per_second"].as_f64().unwrap() > 0.0,
        "{ended}"
    );

    // Both sides are in the history, in order, with what was sent and streamed.
    let saved = messages(&s, &t.key, &chat_id).await;
    assert_eq!(saved.len(), 2, "{saved:?}");
    assert_eq!(saved[0]["id"], user_msg.as_str());
    assert_eq!(saved[0]["role"], "user");
    assert_eq!(saved[0]["content"], "Hello there");
    assert_eq!(saved[0]["metadata"], json!({"source": "test", "n": [1, 2]}));
    assert_eq!(saved[1]["id"], reply_id);
    assert_eq!(saved[1]["role"], "assistant");
    assert_eq!(saved[1]["content"], text.as_str());
    assert_eq!(saved[1]["status"], "complete");

    // Ping, and a second turn that sees the first (its prompt is longer).
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.event().await["event_type"], "pong");
    ws.send(json!({"type": "message", "content": "And again"}))
        .await;
    let (_, _, ended2) = read_reply(&mut ws).await;
    assert!(
        ended2["usage"]["prompt_tokens"].as_u64() > ended["usage"]["prompt_tokens"].as_u64(),
        "the second prompt holds the first turn"
    );
    assert_eq!(messages(&s, &t.key, &chat_id).await.len(), 4);
    ws.close().await;

    // Credentials as headers work too.
    let mut ws = Ws::connect_headers(
        &s,
        &[
            ("X-API-Key", &t.key),
            ("X-User-ID", "alice"),
            ("X-Chat-ID", &chat_id),
        ],
    )
    .await;
    assert_eq!(ws.event().await["event_type"], "connection_established");
    ws.close().await;
    s.stop().await;
}

async fn refused_connections_get_an_error_and_a_close_code(b: Backend) {
    let settings = ServerSettings {
        quotas: QuotaDefaults {
            max_connections: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = TestServer::start_full(b, settings, tiny_model(None)).await;
    let t = s.tenant("acme").await;
    let other = s.tenant("other").await;
    let chat_id = chat(&s, &t.key, "alice", 4).await;
    let foreign = chat(&s, &other.key, "alice", 4).await;
    let k = &t.key;
    let cases: Vec<(String, &str, u16)> = vec![
        (
            format!("user_id=alice&chat_id={chat_id}"),
            "missing_api_key",
            4401,
        ),
        (
            format!("api_key=cfk_nope&user_id=alice&chat_id={chat_id}"),
            "invalid_api_key",
            4401,
        ),
        (
            format!("api_key={k}&chat_id={chat_id}"),
            "missing_parameter",
            4400,
        ),
        (
            format!("api_key={k}&user_id=alice"),
            "missing_parameter",
            4400,
        ),
        (
            format!("api_key={k}&user_id=alice&chat_id=nope"),
            "validation_error",
            4400,
        ),
        (
            format!("api_key={k}&user_id=a%20b&chat_id={chat_id}"),
            "validation_error",
            4400,
        ),
        (
            format!("api_key={k}&user_id=alice&chat_id={}", uuid::Uuid::new_v4()),
            "chat_not_found",
            4404,
        ),
        (
            format!("api_key={k}&user_id=bob&chat_id={chat_id}"),
            "chat_not_found",
            4404,
        ),
        (
            format!("api_key={k}&user_id=alice&chat_id={foreign}"),
            "chat_not_found",
            4404,
        ),
    ];
    for (query, code, close) in cases {
        let mut ws = Ws::connect_query(&s, &query).await;
        ws.refused(code, close).await;
    }
    // The tenant's connection limit; another tenant is not affected; a freed place is reusable.
    let mut a = Ws::connect(&s, k, "alice", &chat_id).await;
    a.event().await;
    let mut b2 = Ws::connect(&s, k, "alice", &chat_id).await;
    b2.event().await;
    let mut c = Ws::connect(&s, k, "alice", &chat_id).await;
    c.refused("too_many_connections", 4429).await;
    let mut o = Ws::connect(&s, &other.key, "alice", &foreign).await;
    assert_eq!(o.event().await["event_type"], "connection_established");
    a.close().await;
    let mut again = None;
    for _ in 0..100 {
        let mut d = Ws::connect(&s, k, "alice", &chat_id).await;
        if d.event().await["event_type"] == "connection_established" {
            again = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a closed connection frees its place");
    s.stop().await;
}

async fn bad_input_is_refused_and_the_connection_stays_usable(b: Backend) {
    let mut chat_settings = ChatSettings::default();
    chat_settings.messages.max_frame_bytes = 2048;
    chat_settings.messages.max_content_chars = 100;
    let settings = ServerSettings {
        chat: chat_settings,
        quotas: QuotaDefaults {
            ws_messages_per_second: 1000,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = TestServer::start_full(b, settings, tiny_model(None)).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 4).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("{not json"), "invalid_json"),
        (Message::text("[1,2]"), "validation_error"),
        (Message::text(r#"{"metadata":{}}"#), "validation_error"),
        (Message::text(r#"{"content":""}"#), "validation_error"),
        (Message::text(r#"{"content":42}"#), "validation_error"),
        (
            Message::text(r#"{"content":"hi","metadata":"x"}"#),
            "validation_error",
        ),
        (
            Message::text(json!({"content": "x".repeat(101)}).to_string()),
            "content_too_long",
        ),
        (
            Message::text(json!({"content": "x".repeat(3000)}).to_string()),
            "message_too_large",
        ),
        (Message::binary(vec![1u8, 2, 3]), "unsupported_message"),
        (
            Message::text(r#"{"type":"shout","content":"hi"}"#),
            "unsupported_message",
        ),
        (Message::text(r#"{"type":"cancel"}"#), "nothing_to_cancel"),
    ];
    for (frame, code) in cases {
        ws.send_raw(frame).await;
        ws.error(code).await;
    }
    // Nothing was saved, and the connection still works.
    assert!(messages(&s, &t.key, &chat_id).await.is_empty());
    ws.send(json!({"content": "fine"})).await;
    assert_eq!(ws.event().await["event_type"], "message_received");
    let (_, _, ended) = read_reply(&mut ws).await;
    assert_eq!(ended["finish_reason"], "length");
    s.stop().await;
}

async fn messages_over_the_rate_are_refused(b: Backend) {
    let s = server(b, ChatSettings::default(), None).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 4).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    for _ in 0..15 {
        ws.send(json!({"type": "ping"})).await;
    }
    let (mut pongs, mut limited) = (0, 0);
    let mut wait = 0;
    for _ in 0..15 {
        let e = ws.event().await;
        match e["event_type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(e["code"], "rate_limited", "{e}");
                wait = e["details"]["retry_after_ms"].as_u64().unwrap();
                assert!(wait > 0 && wait <= 1000, "{e}");
                limited += 1;
            }
            _ => panic!("{e}"),
        }
    }
    // The burst is 10; a few may refill while the 15 frames arrive.
    assert!((10..=12).contains(&pongs), "{pongs} pongs");
    assert_eq!(pongs + limited, 15);
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.event().await["event_type"], "pong");
    s.stop().await;
}

async fn cancel_stops_a_reply_and_one_reply_runs_per_chat(b: Backend) {
    let s = server(b, ChatSettings::default(), Some(Duration::from_millis(10))).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 200).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    ws.send(json!({"content": "Tell me a long story"})).await;
    ws.until("message_stream_started").await;
    let first = ws.until("message_stream_token").await;
    let mut text = first["token"].as_str().unwrap().to_string();
    ws.send(json!({"content": "Another one"})).await;
    // Tokens keep coming; the refusal arrives among them.
    let mut refused = false;
    for _ in 0..1000 {
        let e = ws.event().await;
        if e["event_type"] == "error" {
            assert_eq!(e["code"], "generation_in_progress", "{e}");
            refused = true;
            break;
        }
        text.push_str(e["token"].as_str().unwrap());
    }
    assert!(refused);
    ws.send(json!({"type": "cancel"})).await;
    let ended = loop {
        let e = ws.event().await;
        match e["event_type"].as_str() {
            Some("message_stream_token") => text.push_str(e["token"].as_str().unwrap()),
            Some("message_stream_ended") => break e,
            _ => panic!("{e}"),
        }
    };
    assert_eq!(ended["finish_reason"], "cancelled");
    assert_eq!(ended["content"], text.as_str());
    let n = ended["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 200, "stopped early: {n}");
    let saved = messages(&s, &t.key, &chat_id).await;
    assert_eq!(
        saved.len(),
        2,
        "the refused message was not saved: {saved:?}"
    );
    assert_eq!(saved[1]["status"], "cancelled");
    assert_eq!(saved[1]["content"], text.as_str());
    s.stop().await;
}

async fn replies_outlive_their_socket_and_late_sockets_catch_up(b: Backend) {
    let s = server(b, ChatSettings::default(), Some(Duration::from_millis(8))).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 80).await;
    let mut first = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    first.event().await;
    first.send(json!({"content": "Hi"})).await;
    let started = first.until("message_stream_started").await;
    for _ in 0..3 {
        first.until("message_stream_token").await;
    }
    // A second tab joins mid-reply: it gets the start and the text so far, then live tokens.
    let mut second = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    assert_eq!(second.event().await["event_type"], "connection_established");
    let joined = second.event().await;
    assert_eq!(joined["event_type"], "message_stream_started", "{joined}");
    assert_eq!(joined["message_id"], started["message_id"]);
    // The first socket goes away; the reply goes on.
    first.close().await;
    let mut text = String::new();
    let mut last_index = None;
    let ended = loop {
        let e = second.event().await;
        match e["event_type"].as_str() {
            Some("message_stream_token") => {
                let i = e["index"].as_u64().unwrap();
                assert!(last_index.is_none_or(|l| i > l), "indices grow: {e}");
                last_index = Some(i);
                text.push_str(e["token"].as_str().unwrap());
            }
            Some("message_stream_ended") => break e,
            _ => panic!("{e}"),
        }
    };
    assert_eq!(
        ended["content"],
        text.as_str(),
        "catch-up + live tokens = the reply"
    );
    assert_eq!(ended["finish_reason"], "length");
    second.close().await;
    // A client that reconnects finds the finished reply in the history.
    let saved = messages(&s, &t.key, &chat_id).await;
    assert_eq!(saved[1]["status"], "complete");
    assert_eq!(saved[1]["content"], text.as_str());
    s.stop().await;
}

async fn queues_are_bounded_and_tenants_take_turns(b: Backend) {
    // 16 waiting replies per tenant (the default), one slot. A's first reply lasts long
    // enough (120 tokens, ~0.6 s) for everything below to queue behind it; the others are short.
    let s = server(b, ChatSettings::default(), Some(Duration::from_millis(5))).await;
    let a = s.tenant("a").await;
    let bt = s.tenant("b").await;
    let mut a_socks = Vec::new();
    for i in 0..18 {
        let id = chat(&s, &a.key, "u", if i == 0 { 120 } else { 4 }).await;
        let mut ws = Ws::connect(&s, &a.key, "u", &id).await;
        ws.event().await;
        a_socks.push((id, ws));
    }
    // One runs at once, sixteen wait; the eighteenth is refused and not saved.
    for (_, ws) in a_socks.iter_mut().take(17) {
        ws.send(json!({"content": "go"})).await;
        assert_eq!(ws.event().await["event_type"], "message_received");
    }
    let (full_id, full_ws) = a_socks.last_mut().unwrap();
    full_ws.send(json!({"content": "go"})).await;
    let e = full_ws.error("queue_full").await;
    assert_eq!(e["details"]["queue_capacity"], 16);
    assert!(messages(&s, &a.key, full_id).await.is_empty());

    // Tenant B's single reply goes before A's backlog: next in line.
    let b_chat = chat(&s, &bt.key, "u", 4).await;
    let mut bws = Ws::connect(&s, &bt.key, "u", &b_chat).await;
    bws.event().await;
    bws.send(json!({"content": "me too"})).await;
    assert_eq!(bws.event().await["event_type"], "message_received");
    let queued = bws.event().await;
    if queued["event_type"] == "message_queued" {
        assert_eq!(queued["position"], 1, "{queued}");
    } else {
        // A's running reply ended in between: B started at once.
        assert_eq!(queued["event_type"], "message_stream_started", "{queued}");
    }
    read_reply(&mut bws).await;
    // The last of A's replies was told its place as it changed: 16th first, 1 at the end.
    let mut positions = Vec::new();
    loop {
        let e = a_socks[16].1.event().await;
        match e["event_type"].as_str() {
            Some("message_queued") => positions.push(e["position"].as_u64().unwrap()),
            Some("message_stream_started") => break,
            _ => panic!("{e}"),
        }
    }
    assert_eq!(positions.first(), Some(&16), "{positions:?}");
    assert_eq!(positions.last(), Some(&1), "{positions:?}");
    assert!(positions.windows(2).all(|w| w[0] != w[1]), "{positions:?}");
    for (_, ws) in a_socks.iter_mut().take(17) {
        let end = ws.until("message_stream_ended").await;
        assert_eq!(end["finish_reason"], "length");
    }
    // B's reply started after at most the A reply running when B arrived (and one more if
    // that one ended while B's message was being saved), never after A's backlog.
    let started_at = |m: &Value| {
        chrono::DateTime::parse_from_rfc3339(m["created_at"].as_str().unwrap()).unwrap()
    };
    let b_start = started_at(&messages(&s, &bt.key, &b_chat).await[1]);
    let mut a_before = 0;
    for (id, _) in a_socks.iter().take(17) {
        let saved = messages(&s, &a.key, id).await;
        assert_eq!(saved[1]["status"], "complete");
        if started_at(&saved[1]) < b_start {
            a_before += 1;
        }
    }
    assert!(
        a_before <= 2,
        "{a_before} of A's replies started before B's"
    );
    s.stop().await;
}

async fn deleting_a_chat_stops_its_reply_and_closes_its_sockets(b: Backend) {
    let s = server(b, ChatSettings::default(), Some(Duration::from_millis(10))).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 200).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    ws.send(json!({"content": "Hi"})).await;
    ws.until("message_stream_token").await;
    let (st, _) = s.delete(&format!("/api/v1/chats/{chat_id}"), &t.key).await;
    assert_eq!(st.as_u16(), 204);
    let closed = loop {
        match ws.recv().await {
            Ok(e) if e["event_type"] == "message_stream_token" => continue,
            Ok(e) => {
                assert_eq!(e["code"], "chat_not_found", "{e}");
            }
            Err(c) => break c,
        }
    };
    assert_eq!(closed, (4404, "chat_not_found".to_string()));
    s.stop().await;
}

/// A stop lets the replies already accepted finish: the running one, and the one queued
/// behind it (one slot), which starts while the server drains.
async fn shutdown_lets_running_replies_finish(b: Backend) {
    let s = server(b, ChatSettings::default(), Some(Duration::from_millis(10))).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 30).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    ws.send(json!({"content": "Hi"})).await;
    ws.until("message_stream_token").await;
    let queued_chat = chat(&s, &t.key, "alice", 30).await;
    let mut queued = Ws::connect(&s, &t.key, "alice", &queued_chat).await;
    queued.event().await;
    queued.send(json!({"content": "Hi"})).await;
    queued.until("message_queued").await;
    let store = s.store.clone();
    let tenant = t.id;
    let stopping = tokio::spawn(s.stop());
    for ws in [&mut ws, &mut queued] {
        let ended = ws.until("message_stream_ended").await;
        assert_eq!(
            ended["finish_reason"], "length",
            "finished within the grace period"
        );
        let closed = ws.recv().await.expect_err("closed after the reply");
        assert_eq!(closed.0, 1001);
    }
    let _db = tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stops")
        .unwrap();
    for chat_id in [&chat_id, &queued_chat] {
        let saved = store
            .tenant(tenant)
            .recent_messages(chat_id.parse().unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(saved[1].status, confab::domain::MessageStatus::Complete);
    }
}

async fn silent_sockets_are_pinged_then_dropped(b: Backend) {
    let chat_settings = ChatSettings {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let s = server(b, chat_settings, None).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 4).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    // Not reading means not answering pings: the server gives up on this socket.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut pings = 0;
    let end = loop {
        match tokio::time::timeout(WAIT, ws.inner.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(other)) => panic!("{other:?}"),
            Some(Err(_)) | None => break "dropped",
        }
    };
    assert_eq!(end, "dropped");
    assert!(pings >= 1, "pinged before being dropped");
    // A socket that answers stays.
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.event().await["event_type"], "pong");
    }
    s.stop().await;
}

async fn a_tenant_can_have_its_own_socket_limits(b: Backend) {
    let s = server(b, ChatSettings::default(), None).await;
    let t = s.tenant("acme").await;
    // Before any request: overrides are cached for the auth cache period once read.
    s.store
        .set_tenant_limits(
            "acme",
            confab::domain::TenantLimitsPatch {
                ws_messages_per_second: confab::domain::Patch::Set(3),
                max_connections: confab::domain::Patch::Set(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let chat_id = chat(&s, &t.key, "alice", 4).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    let mut second = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    second.refused("too_many_connections", 4429).await;
    for _ in 0..5 {
        ws.send(json!({"type": "ping"})).await;
    }
    let mut pongs = 0;
    for _ in 0..5 {
        let e = ws.event().await;
        if e["event_type"] == "pong" {
            pongs += 1;
        } else {
            assert_eq!(e["code"], "rate_limited", "{e}");
            assert_eq!(e["details"]["limit_per_second"], 3.0);
        }
    }
    assert!((3..=4).contains(&pongs), "{pongs}");
    s.stop().await;
}

async fn a_server_wide_bound_answers_server_busy(b: Backend) {
    let chat_settings = ChatSettings {
        max_waiting_total: 2,
        ..Default::default()
    };
    let s = server(b, chat_settings, Some(Duration::from_millis(20))).await;
    let a = s.tenant("a").await;
    let bt = s.tenant("b").await;
    let mut socks = Vec::new();
    for (key, _) in [(&a.key, 0), (&a.key, 1), (&bt.key, 0), (&bt.key, 1)] {
        let id = chat(&s, key, "u", 50).await;
        let mut ws = Ws::connect(&s, key, "u", &id).await;
        ws.event().await;
        socks.push(ws);
    }
    // One runs, two wait (a's second, b's first): the server is at its bound for everyone.
    for ws in socks.iter_mut().take(3) {
        ws.send(json!({"content": "go"})).await;
        assert_eq!(ws.event().await["event_type"], "message_received");
    }
    socks[3].send(json!({"content": "go"})).await;
    let e = socks[3].error("server_busy").await;
    assert!(e["details"]["retry_after_ms"].as_u64().unwrap() > 0, "{e}");
    s.stop().await;
}

async fn usage_totals_match_the_replies(b: Backend) {
    let s = server(b, ChatSettings::default(), None).await;
    let t = s.tenant("acme").await;
    let other = s.tenant("other").await;
    let mut want: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    for (user, n) in [("ann", 2), ("bob", 1)] {
        let id = chat(&s, &t.key, user, 5).await;
        let mut ws = Ws::connect(&s, &t.key, user, &id).await;
        ws.event().await;
        for i in 0..n {
            ws.send(json!({ "content": format!("question {i}") })).await;
            let (_, _, end) = read_reply(&mut ws).await;
            let e = want.entry(user).or_default();
            e.0 += end["usage"]["prompt_tokens"].as_u64().unwrap();
            e.1 += end["usage"]["completion_tokens"].as_u64().unwrap();
            e.2 += 1;
        }
        ws.close().await;
        // Deleting the chat does not erase what it cost.
        s.delete(&format!("/api/v1/chats/{id}"), &t.key).await;
    }
    let (st, v) = s.get("/api/v1/usage", &t.key).await;
    assert_eq!(st.as_u16(), 200, "{v}");
    let users = v["users"].as_array().unwrap();
    assert_eq!(users.len(), 2, "{v}");
    let mut totals = (0, 0, 0);
    for u in users {
        let w = want[u["user_id"].as_str().unwrap()];
        assert_eq!(u["prompt_tokens"], w.0, "{v}");
        assert_eq!(u["completion_tokens"], w.1, "{v}");
        assert_eq!(u["replies"], w.2, "{v}");
        totals = (totals.0 + w.0, totals.1 + w.1, totals.2 + w.2);
    }
    assert_eq!(
        v["totals"],
        json!({"prompt_tokens": totals.0, "completion_tokens": totals.1, "replies": totals.2})
    );
    let today = chrono::Utc::now().date_naive().to_string();
    let (_, one) = s
        .get(
            &format!("/api/v1/usage?from={today}&to={today}&user_id=bob"),
            &t.key,
        )
        .await;
    assert_eq!(one["users"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["totals"]["replies"], 1);
    // Another tenant sees none of it; bad ranges are refused with the parameter named.
    let (_, theirs) = s.get("/api/v1/usage", &other.key).await;
    assert_eq!(theirs["totals"]["replies"], 0);
    let (st, e) = s
        .get("/api/v1/usage?from=2026-02-01&to=2026-01-01", &t.key)
        .await;
    let d = crate::common::assert_error(st, &e, 400, "validation_error");
    assert_eq!(d["parameter"], "from");
    let (st, e) = s.get("/api/v1/usage?from=yesterday", &t.key).await;
    crate::common::assert_error(st, &e, 400, "validation_error");
    s.stop().await;
}

/// `/metrics` parses as Prometheus text and its series move with traffic (the registry is
/// process-wide and other tests run alongside, so movements are checked as lower bounds).
async fn metrics_parse_and_move_with_traffic(b: Backend) {
    let s = server(b, ChatSettings::default(), None).await;
    let scrape = || async {
        let r = s
            .http
            .get(format!("{}/metrics", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = r.text().await.unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("Prometheus text format")
    };
    let value = |sc: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| -> f64 {
        sc.samples
            .iter()
            .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref h) => {
                    h.iter().map(|c| c.count).fold(0.0, f64::max)
                }
                _ => 0.0,
            })
            .sum()
    };
    let t = s.tenant("acme").await;
    let before = scrape().await;
    let id = chat(&s, &t.key, "u", 6).await;
    let mut ws = Ws::connect(&s, &t.key, "u", &id).await;
    ws.event().await;
    let during = scrape().await;
    assert!(value(&during, "confab_websocket_connections", &[]) >= 1.0);
    ws.send(json!({"content": "hi"})).await;
    let (_, _, end) = read_reply(&mut ws).await;
    let after = scrape().await;
    let created = [
        ("route", "/api/v1/chats"),
        ("method", "POST"),
        ("status", "201"),
    ];
    assert!(
        value(&after, "confab_http_requests_total", &created)
            >= value(&before, "confab_http_requests_total", &created) + 1.0
    );
    let generated = end["usage"]["completion_tokens"].as_f64().unwrap();
    assert!(
        value(&after, "confab_generated_tokens_total", &[])
            >= value(&before, "confab_generated_tokens_total", &[]) + generated
    );
    assert!(
        value(&after, "confab_prompt_tokens_total", &[])
            > value(&before, "confab_prompt_tokens_total", &[])
    );
    for name in [
        "confab_time_to_first_token_seconds_count",
        "confab_inter_token_latency_seconds_count",
        "confab_http_request_duration_seconds_count",
    ] {
        let (a, b2) = (value(&after, name, &[]), value(&before, name, &[]));
        assert!(a > b2, "{name}: {b2} -> {a}");
    }
    ws.close().await;
    s.stop().await;
}

/// With several reply slots, replies of different chats stream at the same time (the
/// engine batches them): all three have streamed a token while none has finished, since
/// cancelling them then ends every one as `cancelled` (one after another, the first would
/// have run to its length before the third started).
async fn replies_of_several_chats_stream_together(b: Backend) {
    let s = TestServer::start_full(
        b,
        ServerSettings::default(),
        tiny_model_batched(Some(Duration::from_millis(10)), 3),
    )
    .await;
    let t = s.tenant("acme").await;
    let mut sockets = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let chat_id = chat(&s, &t.key, user, 200).await;
        let mut ws = Ws::connect(&s, &t.key, user, &chat_id).await;
        ws.event().await;
        ws.send(json!({"content": "Tell me a long story"})).await;
        sockets.push((ws, chat_id, user));
    }
    for (ws, _, _) in sockets.iter_mut() {
        ws.until("message_stream_token").await;
    }
    for (ws, _, _) in sockets.iter_mut() {
        ws.send(json!({"type": "cancel"})).await;
    }
    for (ws, chat_id, user) in sockets.iter_mut() {
        let ended = ws.until("message_stream_ended").await;
        assert_eq!(ended["finish_reason"], "cancelled", "{user}: {ended}");
        let saved = messages(&s, &t.key, chat_id).await;
        assert_eq!(saved[1]["status"], "cancelled", "{user}");
        assert_eq!(saved[1]["content"], ended["content"], "{user}");
    }
    s.stop().await;
}

async fn a_frame_over_the_hard_limit_closes_with_1009(b: Backend) {
    let mut chat_settings = ChatSettings::default();
    chat_settings.messages.max_frame_bytes = 2048;
    let s = server(b, chat_settings, None).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 4).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    // The hard limit is max(4 × the frame limit, 1 MiB). The server stops reading at the
    // limit, so the client reads while it writes, as a browser does.
    let (mut tx, mut rx) = ws.inner.split();
    let writer = tokio::spawn(async move {
        let _ = tx.send(Message::text("x".repeat(2 * 1024 * 1024))).await;
    });
    let closed = loop {
        let frame = tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("a frame in time");
        match frame {
            Some(Ok(Message::Close(Some(c)))) => break (u16::from(c.code), c.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    writer.await.unwrap();
    assert_eq!(closed, (1009, "message_too_large".to_string()));
    s.stop().await;
}

async fn every_frame_counts_against_the_rate_and_floods_are_closed(b: Backend) {
    let s = server(b, ChatSettings::default(), None).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 4).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    // Invalid JSON and cancels cost a token like messages (burst 10).
    for i in 0..15 {
        let frame = if i % 2 == 0 {
            "{not json"
        } else {
            r#"{"type":"cancel"}"#
        };
        ws.send_raw(Message::text(frame)).await;
    }
    let mut limited = 0;
    for _ in 0..15 {
        let e = ws.event().await;
        assert_eq!(e["event_type"], "error", "{e}");
        if e["code"] == "rate_limited" {
            limited += 1;
        } else {
            assert!(
                e["code"] == "invalid_json" || e["code"] == "nothing_to_cancel",
                "{e}"
            );
        }
    }
    assert!((3..=5).contains(&limited), "{limited} of 15 refused");
    // A client that ignores `rate_limited` and keeps sending is closed (1008), after a
    // bounded number of answers.
    for _ in 0..200 {
        if ws.inner.send(Message::text("{not json")).await.is_err() {
            break;
        }
    }
    let mut answers = 0;
    let closed = loop {
        match ws.recv().await {
            Ok(_) => answers += 1,
            Err(c) => break c,
        }
    };
    assert_eq!(closed, (1008, "rate_limited".to_string()));
    assert!(answers <= 60, "{answers} answers before the close");
    s.stop().await;
}

/// A client that stops reading: its socket is dropped after the write-stall timeout, the
/// chat's other socket keeps receiving the reply meanwhile, and the place it held is freed.
async fn a_socket_that_stops_reading_is_dropped_without_blocking_others(b: Backend) {
    // The rate is high enough that the stalled client's pings are all answered: a refused
    // flood would be closed (1008) for its rate, not for the stall this test is about.
    let settings = ServerSettings {
        quotas: QuotaDefaults {
            max_connections: 2,
            ws_messages_per_second: 1_000_000,
            ..Default::default()
        },
        connections: confab::server::ConnectionLimits {
            write_stall_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let s = TestServer::start_full(b, settings, tiny_model(None)).await;
    let t = s.tenant("acme").await;
    let c = s
        .create_chat(
            &t.key,
            json!({"user_id": "alice", "config": {"temperature": 1.0, "max_tokens": 40}}),
        )
        .await;
    let chat_id = c["id"].as_str().unwrap().to_string();
    let mut reader = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    reader.event().await;
    // The stalled client: a 4 KiB receive buffer, and it never reads after the handshake.
    let addr: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let url = format!(
        "{}/ws/chat?api_key={}&user_id=alice&chat_id={chat_id}",
        s.base.replacen("http", "ws", 1),
        t.key
    );
    let (mut stalled, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    // The replies alone fill the server's send buffer (autotuned to megabytes on loopback)
    // only after dozens of turns, slower than any deadline on a loaded machine. The stalled
    // client also asks for pongs it never reads: its own answers fill the buffers within
    // moments, whatever the machine's speed. Its writes block once the server stops reading
    // it, so they run apart and end with the test.
    let pinger = tokio::spawn(async move {
        for _ in 0..200_000 {
            if stalled
                .send(Message::text(r#"{"type":"ping"}"#))
                .await
                .is_err()
            {
                break;
            }
        }
        stalled
    });
    // Replies stream to both sockets; the reader takes each to its end.
    let mut freed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for turn in 0..200 {
        if std::time::Instant::now() > deadline {
            break;
        }
        reader
            .send(json!({"content": format!("turn {turn}")}))
            .await;
        let (_, tokens, ended) = read_reply(&mut reader).await;
        assert!(!tokens.is_empty(), "{ended}");
        // Once the server dropped the stalled socket, a new connection fits under the cap.
        let url = format!(
            "{}/ws/chat?api_key={}&user_id=alice&chat_id={chat_id}",
            s.base.replacen("http", "ws", 1),
            t.key
        );
        let (mut third, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let first = tokio::time::timeout(WAIT, third.next()).await.unwrap();
        if let Some(Ok(Message::Text(t))) = first {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["event_type"] == "connection_established" {
                freed = true;
                break;
            }
            assert_eq!(v["code"], "too_many_connections", "{v}");
        }
    }
    assert!(freed, "the stalled socket was never dropped");
    pinger.abort();
    s.stop().await;
}

backend_tests!(
    a_socket_that_stops_reading_is_dropped_without_blocking_others,
    a_frame_over_the_hard_limit_closes_with_1009,
    every_frame_counts_against_the_rate_and_floods_are_closed,
    replies_of_several_chats_stream_together,
    metrics_parse_and_move_with_traffic,
    usage_totals_match_the_replies,
    a_server_wide_bound_answers_server_busy,
    a_tenant_can_have_its_own_socket_limits,
    silent_sockets_are_pinged_then_dropped,
    a_reply_streams_and_both_sides_are_saved,
    refused_connections_get_an_error_and_a_close_code,
    bad_input_is_refused_and_the_connection_stays_usable,
    messages_over_the_rate_are_refused,
    cancel_stops_a_reply_and_one_reply_runs_per_chat,
    replies_outlive_their_socket_and_late_sockets_catch_up,
    queues_are_bounded_and_tenants_take_turns,
    deleting_a_chat_stops_its_reply_and_closes_its_sockets,
    shutdown_lets_running_replies_finish,
);

/// The real SmolLM2 over the whole stack: a three-turn conversation in which each answer
/// builds on the one before (greedy, so the text is fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_remembers_earlier_turns() {
    let model = ModelSlot::new(ModelStatus::Ready(crate::smollm2::engine().clone()));
    let s = TestServer::start_full(Backend::Sqlite, settings(ChatSettings::default()), model).await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 100).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    let mut answers = Vec::new();
    for q in [
        "What is the capital of France?",
        "What is the most famous tower in that city?",
        "How tall is it?",
    ] {
        ws.send(json!({ "content": q })).await;
        let (_, _, ended) = read_reply(&mut ws).await;
        assert_eq!(ended["finish_reason"], "stop", "{ended}");
        let text = ended["content"].as_str().unwrap().to_string();
        assert!(!text.contains("<|im_"), "no template tokens: {text}");
        answers.push(text);
    }
    // "That city" and "it" only make sense with the earlier turns in the prompt.
    assert!(answers[0].contains("Paris"), "{answers:?}");
    assert!(answers[1].contains("Eiffel"), "{answers:?}");
    assert!(answers[2].contains("Eiffel"), "{answers:?}");
    let saved = messages(&s, &t.key, &chat_id).await;
    assert_eq!(saved.len(), 6);
    assert_eq!(saved[3]["content"], answers[1].as_str());
    s.stop().await;
}

/// `confab bench serve` against a live server: every turn of every chat is measured, no
/// errors, and its chats are gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_serve_measures_every_turn() {
    let s = server(Backend::Sqlite, ChatSettings::default(), None).await;
    let t = s.tenant("bench").await;
    let cfg = confab::serve_bench::ServeBenchConfig {
        url: s.base.clone(),
        api_key: t.key.clone(),
        chats: 3,
        turns: 3,
        max_tokens: 6,
        reply_timeout: Duration::from_secs(30),
        watch_urls: Vec::new(),
    };
    let r = confab::serve_bench::run(&cfg).await.expect("bench runs");
    assert_eq!(r.errors, 0, "{:?}", r.error_samples);
    assert_eq!(r.replies, 9);
    assert!(r.generated_tokens > 0 && r.aggregate_tokens_per_second > 0.0);
    // The window in which all three chats were in conversation lies inside the run and
    // holds some of their tokens.
    assert!(r.all_active_seconds > 0.0 && r.all_active_seconds <= r.wall_seconds);
    let steady = r
        .all_active_tokens_per_second
        .expect("a window with all chats active");
    assert!(steady > 0.0 && steady * r.all_active_seconds <= r.generated_tokens as f64);
    assert_eq!(r.ttft_ms_by_turn.len(), 3);
    for turn in &r.ttft_ms_by_turn {
        let p = turn.as_ref().expect("every turn has a first token");
        assert!(p.count >= 1 && p.p50 <= p.p99);
    }
    for i in 0..3 {
        let (_, v) = s
            .get(&format!("/api/v1/chats/user/bench-{i}"), &t.key)
            .await;
        assert_eq!(v["total"], 0, "bench chats are deleted: {v}");
    }
    s.stop().await;
}

/// SQLite locked by another writer for longer than its busy timeout while a reply streams:
/// the final save is retried until the lock goes, and `message_stream_ended` comes after the
/// reply is saved with its full text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_does_not_lose_a_finished_reply() {
    use sea_orm::sqlx::{Connection, Executor, SqliteConnection};
    let chat_settings = ChatSettings {
        save_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let s = server(
        Backend::Sqlite,
        chat_settings,
        Some(Duration::from_millis(20)),
    )
    .await;
    let t = s.tenant("acme").await;
    let chat_id = chat(&s, &t.key, "alice", 30).await;
    let mut ws = Ws::connect(&s, &t.key, "alice", &chat_id).await;
    ws.event().await;
    ws.send(json!({"content": "hello"})).await;
    ws.until("message_stream_started").await;
    let mut locker = SqliteConnection::connect(&s.db_url).await.unwrap();
    locker.execute("BEGIN EXCLUSIVE").await.unwrap();
    let locked_at = std::time::Instant::now();
    // The reply ends while the database is locked (30 tokens at 20 ms); the store's busy
    // timeout is 10 s, so the first save attempt fails and is retried.
    let unlock = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(12)).await;
        locker.execute("COMMIT").await.unwrap();
        locker.close().await.unwrap();
    });
    // A write while the lock holds past the busy timeout is a retryable 503, not a 500.
    let blocked_write = {
        let (http, base, key) = (s.http.clone(), s.base.clone(), t.key.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{base}/api/v1/chats"))
                .header("X-API-Key", key)
                .json(&json!({"user_id": "bob"}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let mut text = String::new();
    let ended = loop {
        let e = tokio::time::timeout(Duration::from_secs(40), ws.recv())
            .await
            .expect("an event in time")
            .expect("open");
        match e["event_type"].as_str() {
            Some("message_stream_token") => text.push_str(e["token"].as_str().unwrap()),
            Some("message_stream_ended") => break e,
            Some("error") => panic!("no error while the save is retried: {e}"),
            _ => {}
        }
    };
    assert!(
        locked_at.elapsed() >= Duration::from_secs(11),
        "ended only once saved, after the lock: {:?}",
        locked_at.elapsed()
    );
    unlock.await.unwrap();
    let (status, body) = blocked_write.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    assert_eq!(ended["content"].as_str().unwrap(), text);
    assert!(!text.is_empty());
    let saved = messages(&s, &t.key, &chat_id).await;
    assert_eq!(saved.len(), 2);
    assert_eq!(saved[1]["content"].as_str().unwrap(), text);
    assert_eq!(saved[1]["status"], "complete", "{}", saved[1]);
    s.stop().await;
}
