//! API keys: missing, wrong, revoked.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::common::{assert_error, Backend, TestServer};

async fn missing_and_invalid_keys(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let c = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let id = c["id"].as_str().unwrap();
    let ops: Vec<(Method, String, Option<serde_json::Value>)> = vec![
        (
            Method::POST,
            "/api/v1/chats/".into(),
            Some(json!({"user_id": "u"})),
        ),
        (Method::GET, "/api/v1/chats/user/u".into(), None),
        (Method::GET, format!("/api/v1/chats/{id}"), None),
        (Method::GET, format!("/api/v1/chats/{id}/messages"), None),
        (
            Method::PATCH,
            format!("/api/v1/chats/{id}"),
            Some(json!({"title": "x"})),
        ),
        (Method::DELETE, format!("/api/v1/chats/{id}"), None),
    ];
    for (m, path, body) in &ops {
        let (st, v) = s.call(m.clone(), path, None, body.clone()).await;
        let d = assert_error(st, &v, 401, "missing_api_key");
        assert_eq!(d["header"], "X-API-Key");
        for bad in ["cfk_nope", "x", "a key with spaces", &format!("{}x", t.key)] {
            let (st, v) = s.call(m.clone(), path, Some(bad), body.clone()).await;
            assert_error(st, &v, 401, "invalid_api_key");
        }
    }
    // Nothing was changed by the rejected calls.
    let (_, v) = s.get(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_eq!(v, c);
    s.stop().await;
}

async fn revoked_key_stops_working(b: Backend) {
    let settings = confab::ServerSettings {
        auth_cache_ttl: Duration::from_millis(200),
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let t = s.tenant("acme").await;
    let (st, _) = s.get("/api/v1/chats/user/u", &t.key).await;
    assert_eq!(st.as_u16(), 200);
    let prefix = &t.key[..12];
    s.store.revoke_key(prefix).await.expect("revoke");
    // The cached positive answer lives at most the TTL; poll, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (st, v) = s.get("/api/v1/chats/user/u", &t.key).await;
        if st.as_u16() == 401 {
            assert_error(st, &v, 401, "invalid_api_key");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "revoked key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second key of the same tenant keeps working and sees the same data.
    let k2 = confab::credentials::generate();
    s.store.create_key("acme", &k2).await.expect("new key");
    let (st, _) = s.get("/api/v1/chats/user/u", &k2.secret).await;
    assert_eq!(st.as_u16(), 200);
    s.stop().await;
}

crate::backend_tests!(missing_and_invalid_keys, revoked_key_stops_working);
