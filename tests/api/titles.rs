//! Titles written by the model: a chat created without a title gets one after its first
//! reply, announced by a `chat_updated` event; a chat with a title keeps it; the server can
//! be told not to. The tiny model writes nonsense, but one line of it, cleaned.

use confab::chat::ChatSettings;
use serde_json::{json, Value};

use crate::backend_tests;
use crate::common::{Backend, TestServer};
use crate::ws::{tiny_model, Ws};

async fn server(b: Backend, auto_titles: bool) -> TestServer {
    TestServer::start_full(
        b,
        confab::ServerSettings {
            chat: ChatSettings {
                auto_titles,
                ..Default::default()
            },
            ..Default::default()
        },
        tiny_model(None),
    )
    .await
}

async fn chat(s: &TestServer, key: &str, title: Option<&str>) -> String {
    let mut body = json!({"user_id": "u", "config": {"temperature": 0, "max_tokens": 4}});
    if let Some(t) = title {
        body["title"] = json!(t);
    }
    s.create_chat(key, body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sends a message and reads events until its reply ended; returns every event seen.
async fn exchange(ws: &mut Ws, text: &str) -> Vec<Value> {
    ws.send(json!({"content": text})).await;
    let mut seen = Vec::new();
    for _ in 0..1000 {
        let e = ws.event().await;
        let end = e["event_type"] == "message_stream_ended";
        seen.push(e);
        if end {
            return seen;
        }
    }
    panic!("no end of the reply");
}

async fn a_chat_without_a_title_gets_one_after_its_first_reply(b: Backend) {
    let s = server(b, true).await;
    let t = s.tenant("acme").await;
    let id = chat(&s, &t.key, None).await;
    let mut ws = Ws::connect(&s, &t.key, "u", &id).await;
    ws.until("connection_established").await;
    exchange(&mut ws, "Plan a trip to Paris").await;
    let updated = ws.until("chat_updated").await;
    assert_eq!(updated["chat_id"], id.as_str());
    let title = updated["title"].as_str().expect("a title").to_string();
    assert!(
        !title.is_empty() && title.chars().count() <= 80,
        "{title:?}"
    );
    assert!(!title.contains('\n') && !title.contains('"'), "{title:?}");
    let (_, c) = s.get(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_eq!(c["title"], title.as_str());
    // Only the first turn names a chat: a second reply brings no new title.
    let second = exchange(&mut ws, "And Rome?").await;
    assert!(second.iter().all(|e| e["event_type"] != "chat_updated"));
    // A chat whose client gave a title keeps it.
    let named = chat(&s, &t.key, Some("Mine")).await;
    let mut ws2 = Ws::connect(&s, &t.key, "u", &named).await;
    ws2.until("connection_established").await;
    exchange(&mut ws2, "Hello").await;
    // Another untitled chat is titled after this one would have been: the background queue
    // runs in order, so when that title arrives this chat's turn has passed.
    let later = chat(&s, &t.key, None).await;
    let mut ws3 = Ws::connect(&s, &t.key, "u", &later).await;
    ws3.until("connection_established").await;
    exchange(&mut ws3, "Hi").await;
    ws3.until("chat_updated").await;
    let (_, c) = s.get(&format!("/api/v1/chats/{named}"), &t.key).await;
    assert_eq!(c["title"], "Mine");
    ws.close().await;
    ws2.close().await;
    ws3.close().await;
    s.stop().await;
}

async fn titles_can_be_turned_off(b: Backend) {
    let s = server(b, false).await;
    let t = s.tenant("acme").await;
    let first = chat(&s, &t.key, None).await;
    let mut ws = Ws::connect(&s, &t.key, "u", &first).await;
    ws.until("connection_established").await;
    exchange(&mut ws, "Hello").await;
    exchange(&mut ws, "Again").await;
    let (_, c) = s.get(&format!("/api/v1/chats/{first}"), &t.key).await;
    assert_eq!(c["title"], Value::Null);
    ws.close().await;
    s.stop().await;
}

backend_tests!(
    a_chat_without_a_title_gets_one_after_its_first_reply,
    titles_can_be_turned_off,
);
