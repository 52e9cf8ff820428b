//! API keys: missing, wrong, revoked, named, expired.

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
    s.store.revoke_key(None, prefix).await.expect("revoke");
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
    s.store
        .create_key("acme", &k2, &Default::default())
        .await
        .expect("new key");
    let (st, _) = s.get("/api/v1/chats/user/u", &k2.secret).await;
    assert_eq!(st.as_u16(), 200);
    s.stop().await;
}

/// A key with a name and an expiry: listed with both and its last use; past its expiry it
/// answers 401 `api_key_expired` (REST) and closes sockets with 4401; names and expiries
/// out of bounds are refused when the key is made.
async fn named_keys_expire(b: Backend) {
    use confab::store::{KeySpec, StoreError};
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let key = confab::credentials::generate();
    let expires_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let spec = KeySpec {
        name: Some("nightly export".into()),
        expires_at: Some(expires_at),
    };
    s.store.create_key("acme", &key, &spec).await.expect("key");
    let (st, _) = s.get("/api/v1/chats/user/u", &key.secret).await;
    assert_eq!(st.as_u16(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let keys = s.store.list_keys("acme").await.unwrap();
        let k = keys.into_iter().find(|k| k.prefix == key.prefix).unwrap();
        if k.last_used_at.is_some() || tokio::time::Instant::now() > deadline {
            break k;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(listed.name.as_deref(), Some("nightly export"));
    assert_eq!(
        listed.expires_at.map(|t| t.timestamp_millis()),
        Some(expires_at.timestamp_millis())
    );
    assert!(listed.last_used_at.is_some(), "its use is recorded");

    let wait = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    let (st, v) = s.get("/api/v1/chats/user/u", &key.secret).await;
    assert_error(st, &v, 401, "api_key_expired");
    assert!(v["error"]["details"]["expired_at"].is_string(), "{v}");
    let mut ws = crate::ws::Ws::connect_query(
        &s,
        &format!(
            "api_key={}&user_id=u&chat_id={}",
            key.secret,
            uuid::Uuid::new_v4()
        ),
    )
    .await;
    ws.refused("api_key_expired", 4401).await;
    // The tenant's other key is unaffected.
    let (st, _) = s.get("/api/v1/chats/user/u", &t.key).await;
    assert_eq!(st.as_u16(), 200);

    let refused = |spec: KeySpec| {
        let store = s.store.clone();
        async move {
            let key = confab::credentials::generate();
            store.create_key("acme", &key, &spec).await
        }
    };
    for spec in [
        KeySpec {
            expires_at: Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
            ..Default::default()
        },
        KeySpec {
            name: Some(String::new()),
            ..Default::default()
        },
        KeySpec {
            name: Some("x".repeat(101)),
            ..Default::default()
        },
        KeySpec {
            name: Some("tab\there".into()),
            ..Default::default()
        },
    ] {
        let shown = format!("{spec:?}");
        assert!(
            matches!(refused(spec).await, Err(StoreError::Invalid(_))),
            "{shown}"
        );
    }
    s.stop().await;
}

crate::backend_tests!(
    missing_and_invalid_keys,
    revoked_key_stops_working,
    named_keys_expire
);
