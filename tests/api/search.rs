//! `GET /api/v1/chats/user/{user_id}?q=…`: full-text search of titles and messages with each
//! database's own engine (SQLite FTS5, PostgreSQL `tsvector`), tenant- and user-scoped, newest
//! first, with snippets whose highlights point at the matched words.

use confab::domain::{MessageStatus, Parent, Role};
use confab::store::ReplyUpdate;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{assert_error, Backend, TestServer};

async fn say(
    s: &TestServer,
    tenant: confab::store::TenantId,
    chat: &str,
    role: Role,
    text: &str,
) -> Uuid {
    s.add_message(tenant, chat, Parent::Active, role, text, json!({}))
        .await
}

async fn chat(s: &TestServer, key: &str, user: &str, title: Option<&str>) -> String {
    let mut body = json!({"user_id": user});
    if let Some(t) = title {
        body["title"] = json!(t);
    }
    s.create_chat(key, body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn search(s: &TestServer, key: &str, user: &str, q: &str) -> Value {
    let (st, v) = s
        .get(
            &format!("/api/v1/chats/user/{user}?q={}", url_escape(q)),
            key,
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{q}: {v}");
    v
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn found(v: &Value) -> Vec<String> {
    v["chats"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// The highlighted parts of a result's snippet.
fn highlighted(c: &Value) -> Vec<String> {
    let m = &c["match"];
    let chars: Vec<char> = m["snippet"].as_str().unwrap().chars().collect();
    m["highlights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let (a, b) = (
                r[0].as_u64().unwrap() as usize,
                r[1].as_u64().unwrap() as usize,
            );
            chars[a..b].iter().collect()
        })
        .collect()
}

async fn search_finds_words_in_titles_and_messages(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let t2 = s.tenant("other").await;
    let trip = chat(&s, &t.key, "alice", Some("Trip planning")).await;
    say(
        &s,
        t.id,
        &trip,
        Role::User,
        "We are travelling to Paris in the spring.",
    )
    .await;
    let trip_reply = say(
        &s,
        t.id,
        &trip,
        Role::Assistant,
        "Paris is lovely in April; book the museums early.",
    )
    .await;
    let bread = chat(&s, &t.key, "alice", None).await;
    say(
        &s,
        t.id,
        &bread,
        Role::User,
        "How do I start baking bread at home?",
    )
    .await;
    let dough = say(
        &s,
        t.id,
        &bread,
        Role::Assistant,
        "Knead the dough for ten minutes.",
    )
    .await;
    let recipes = chat(&s, &t.key, "alice", Some("Bread recipes")).await;
    // Others' chats with the same words: another user's, another tenant's.
    let bobs = chat(&s, &t.key, "bob", None).await;
    say(&s, t.id, &bobs, Role::User, "Paris or bread?").await;
    let theirs = chat(&s, &t2.key, "alice", Some("Paris bread")).await;
    say(&s, t2.id, &theirs, Role::User, "Paris bread").await;

    // A word in messages: the newest matching message gives the snippet.
    let v = search(&s, &t.key, "alice", "paris").await;
    assert_eq!(found(&v), vec![trip.clone()], "{v}");
    assert_eq!(v["total"], 1);
    let c = &v["chats"][0];
    assert_eq!(c["match"]["message_id"], trip_reply.to_string(), "{c}");
    assert!(
        c["match"]["snippet"].as_str().unwrap().contains("lovely"),
        "{c}"
    );
    assert_eq!(highlighted(c), ["Paris"], "{c}");
    assert_eq!(c["title"], "Trip planning");
    assert_eq!(c["message_count"], 2);

    // Stemming: other forms of the words match, as each database stems them.
    for (q, want) in [
        ("travel", vec![trip.clone()]),
        ("baked", vec![bread.clone()]),
        ("kneading", vec![bread.clone()]),
    ] {
        let v = search(&s, &t.key, "alice", q).await;
        assert_eq!(found(&v), want, "{q}: {v}");
    }
    // A title, and messages, newest chat first; a title-only match has no message.
    let v = search(&s, &t.key, "alice", "Bread").await;
    assert_eq!(found(&v), vec![recipes.clone(), bread.clone()], "{v}");
    assert_eq!(v["chats"][0]["match"]["message_id"], Value::Null);
    assert_eq!(v["chats"][0]["match"]["snippet"], "Bread recipes");
    assert_eq!(highlighted(&v["chats"][0]), ["Bread"]);
    assert_eq!(highlighted(&v["chats"][1]), ["bread"]);
    // Every word must occur (in the same document: a title or one message).
    assert_eq!(
        found(&search(&s, &t.key, "alice", "bread dough").await),
        Vec::<String>::new()
    );
    assert_eq!(
        found(&search(&s, &t.key, "alice", "knead dough").await),
        vec![bread.clone()]
    );
    // Query syntax is only words: nothing breaks, nothing extra matches.
    for q in [
        "paris OR bread",
        "\"paris",
        "paris*",
        "NEAR(paris bread)",
        "paris -bread",
    ] {
        let v = search(&s, &t.key, "alice", q).await;
        assert!(found(&v).len() <= 1, "{q}: {v}");
    }
    // Paging.
    let (_, v) = s
        .get("/api/v1/chats/user/alice?q=bread&limit=1&offset=1", &t.key)
        .await;
    assert_eq!(found(&v), vec![bread.clone()]);
    assert_eq!(
        (v["total"].as_u64(), v["has_more"].as_bool()),
        (Some(2), Some(false))
    );
    // Without q, the list is as always (no match field).
    let (_, v) = s.get("/api/v1/chats/user/alice", &t.key).await;
    assert_eq!(v["total"], 3);
    assert!(v["chats"][0].get("match").is_none(), "{v}");

    // Changes are searchable at once: a new title, a reply's text as it is saved.
    let (st, _) = s
        .patch(
            &format!("/api/v1/chats/{bread}"),
            &t.key,
            json!({"title": "Sourdough"}),
        )
        .await;
    assert_eq!(st.as_u16(), 200);
    assert_eq!(
        found(&search(&s, &t.key, "alice", "sourdough").await),
        vec![bread.clone()]
    );
    s.store
        .tenant(t.id)
        .update_reply(
            dough,
            ReplyUpdate {
                content: "Let it rise overnight.".into(),
                status: MessageStatus::Complete,
                usage: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        found(&search(&s, &t.key, "alice", "overnight").await),
        vec![bread.clone()]
    );
    assert_eq!(
        found(&search(&s, &t.key, "alice", "dough").await),
        Vec::<String>::new()
    );
    // A deleted chat is gone from results.
    s.delete(&format!("/api/v1/chats/{trip}"), &t.key).await;
    assert_eq!(
        found(&search(&s, &t.key, "alice", "paris").await),
        Vec::<String>::new()
    );
    // The other tenant finds its own.
    assert_eq!(
        found(&search(&s, &t2.key, "alice", "paris").await),
        vec![theirs.clone()]
    );

    // Refusals.
    for q in ["%20", "*()", &"a".repeat(257)] {
        let (st, v) = s
            .get(&format!("/api/v1/chats/user/alice?q={q}"), &t.key)
            .await;
        let d = assert_error(st, &v, 400, "validation_error");
        assert_eq!(d["parameter"], "q", "{v}");
    }
    s.stop().await;
}

backend_tests!(search_finds_words_in_titles_and_messages);
