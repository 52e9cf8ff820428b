//! User-scoped tokens: minted with the tenant key, acting for one user only, wherever a
//! tenant key goes (REST, WebSocket, OpenAI API), expiring on time.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};

use crate::common::{assert_error, Backend, TestServer};
use crate::ws::{tiny_model, Ws};

async fn mint(s: &TestServer, key: &str, user: &str, ttl: u64) -> Value {
    let (st, v) = s
        .post(
            "/api/v1/tokens",
            key,
            json!({"user_id": user, "ttl_seconds": ttl}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{v}");
    v
}

async fn tokens_act_for_one_user(b: Backend) {
    let s = TestServer::start_full(b, Default::default(), tiny_model(None)).await;
    let t = s.tenant("acme").await;
    let minted = mint(&s, &t.key, "alice", 600).await;
    let token = minted["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("cfu_") && token.len() == 44, "{minted}");
    assert_eq!(minted["user_id"], "alice");
    let expires: chrono::DateTime<Utc> = minted["expires_at"].as_str().unwrap().parse().unwrap();
    let left = (expires - Utc::now()).num_seconds();
    assert!((590..=600).contains(&left), "{left}");

    // Its own user's chats: create, list, read, change.
    let mine = s
        .create_chat(
            &token,
            json!({"user_id": "alice", "config": {"max_tokens": 4}}),
        )
        .await;
    let mine_id = mine["id"].as_str().unwrap().to_string();
    let (st, list) = s.get("/api/v1/chats/user/alice", &token).await;
    assert_eq!(st.as_u16(), 200);
    assert_eq!(list["total"], 1);
    let (st, _) = s
        .patch(
            &format!("/api/v1/chats/{mine_id}"),
            &token,
            json!({"title": "x"}),
        )
        .await;
    assert_eq!(st.as_u16(), 200);

    // Another user's: not there, and not to be acted for.
    let theirs = s.create_chat(&t.key, json!({"user_id": "bob"})).await;
    let theirs_id = theirs["id"].as_str().unwrap().to_string();
    for (method, path) in [
        (reqwest::Method::GET, format!("/api/v1/chats/{theirs_id}")),
        (
            reqwest::Method::GET,
            format!("/api/v1/chats/{theirs_id}/messages"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/api/v1/chats/{theirs_id}"),
        ),
    ] {
        let (st, v) = s.call(method, &path, Some(&token), None).await;
        assert_error(st, &v, 404, "chat_not_found");
    }
    let (st, v) = s
        .patch(
            &format!("/api/v1/chats/{theirs_id}"),
            &token,
            json!({"title": "mine now"}),
        )
        .await;
    assert_error(st, &v, 404, "chat_not_found");
    let (st, v) = s.get(&format!("/api/v1/chats/{theirs_id}"), &t.key).await;
    assert_eq!(st.as_u16(), 200, "untouched: {v}");
    assert_eq!(v["title"], Value::Null);
    let (st, v) = s.get("/api/v1/chats/user/bob", &token).await;
    let d = assert_error(st, &v, 403, "forbidden");
    assert_eq!(d["user_id"], "alice");
    let (st, v) = s
        .post("/api/v1/chats", &token, json!({"user_id": "bob"}))
        .await;
    assert_error(st, &v, 403, "forbidden");

    // The tenant's own business: no tokens from tokens, no tenant usage.
    let (st, v) = s
        .post(
            "/api/v1/tokens",
            &token,
            json!({"user_id": "alice", "ttl_seconds": 60}),
        )
        .await;
    assert_error(st, &v, 403, "forbidden");
    let (st, v) = s.get("/api/v1/usage", &token).await;
    assert_error(st, &v, 403, "forbidden");

    // The WebSocket: its user's chat streams (usage recorded under the token), another
    // user's chat is not found.
    let mut ws = Ws::connect(&s, &token, "alice", &mine_id).await;
    ws.until("connection_established").await;
    ws.send(json!({"type": "message", "content": "hi"})).await;
    let end = ws.until("message_stream_ended").await;
    let mut other = Ws::connect(&s, &token, "bob", &theirs_id).await;
    other.refused("chat_not_found", 4404).await;
    let mut report = Value::Null;
    for _ in 0..50 {
        report = s.get("/api/v1/usage", &t.key).await.1;
        if !report["keys"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(report["keys"][0]["key_id"], minted["token_id"], "{report}");
    assert_eq!(
        report["keys"][0]["completion_tokens"],
        end["usage"]["completion_tokens"]
    );

    // The OpenAI API: `user` may only name the token's user.
    let (_, models) = s.get("/v1/models", &token).await;
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let ask = |user: Option<&str>| {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        if let Some(u) = user {
            body["user"] = json!(u);
        }
        s.http
            .post(format!("{}/v1/chat/completions", s.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    assert_eq!(ask(None).await.unwrap().status().as_u16(), 200);
    assert_eq!(ask(Some("alice")).await.unwrap().status().as_u16(), 200);
    let resp = ask(Some("bob")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    s.stop().await;
}

async fn tokens_expire_and_are_checked(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    for (bad, field) in [
        (json!({"user_id": "alice", "ttl_seconds": 0}), "ttl_seconds"),
        (
            json!({"user_id": "alice", "ttl_seconds": 86_401}),
            "ttl_seconds",
        ),
        (
            json!({"user_id": "has space", "ttl_seconds": 60}),
            "user_id",
        ),
        (json!({"ttl_seconds": 60}), ""),
    ] {
        let (st, v) = s.post("/api/v1/tokens", &t.key, bad.clone()).await;
        let d = assert_error(st, &v, 400, "validation_error");
        if !field.is_empty() {
            assert!(v.to_string().contains(field), "{bad}: {d}");
        }
    }
    let minted = mint(&s, &t.key, "alice", 1).await;
    let token = minted["token"].as_str().unwrap();
    let (st, _) = s.get("/api/v1/chats/user/alice", token).await;
    assert_eq!(st.as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (st, v) = s.get("/api/v1/chats/user/alice", token).await;
    assert_error(st, &v, 401, "api_key_expired");
    // A disabled tenant's tokens stop with its keys.
    let fresh = mint(&s, &t.key, "alice", 600).await;
    s.store.set_tenant_disabled("acme", true).await.unwrap();
    let mut refused = false;
    for _ in 0..100 {
        let (st, _) = s
            .get("/api/v1/chats/user/alice", fresh["token"].as_str().unwrap())
            .await;
        if st.as_u16() == 403 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "a disabled tenant's token kept working");
    s.stop().await;
}

crate::backend_tests!(tokens_act_for_one_user, tokens_expire_and_are_checked);
