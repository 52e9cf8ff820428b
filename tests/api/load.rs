//! Load within bounds: one tenant holds 50 WebSocket connections (its limit) that all send at
//! once, while REST traffic runs into the tenant's rate limit. Every request answers in
//! bounded time, every limit answers as documented, memory stays bounded.

use std::time::{Duration, Instant};

use confab::chat::ChatSettings;
use confab::ServerSettings;
use futures_util::future::join_all;
use serde_json::json;

use crate::backend_tests;
use crate::common::{Backend, TestServer};
use crate::ws::{tiny_model, Ws};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

async fn fifty_sockets_and_rest_at_the_limit(b: Backend) {
    let settings = ServerSettings {
        quotas: confab::api::quota::QuotaDefaults {
            requests_per_minute: 120,
            ..Default::default()
        },
        chat: ChatSettings::default(),
        ..Default::default()
    };
    let s = TestServer::start_full(b, settings, tiny_model(Some(Duration::from_millis(20)))).await;
    let t = s.tenant("busy").await;
    let rss_before = rss_kib();
    let started = Instant::now();

    // 50 chats (50 of the 120 requests this minute), one socket each: the tenant's limit.
    let mut chats = Vec::new();
    for _ in 0..50 {
        let c = s
            .create_chat(
                &t.key,
                json!({"user_id": "u", "config": {"temperature": 0, "max_tokens": 8}}),
            )
            .await;
        chats.push(c["id"].as_str().unwrap().to_string());
    }
    let mut sockets = join_all(chats.iter().map(|id| Ws::connect(&s, &t.key, "u", id))).await;
    for ws in sockets.iter_mut() {
        assert_eq!(ws.event().await["event_type"], "connection_established");
    }
    let mut extra = Ws::connect(&s, &t.key, "u", &chats[0]).await;
    let e = extra.event().await;
    assert_eq!(e["code"], "too_many_connections", "{e}");

    // Everyone sends at once while 70 REST requests race for the 70 left in the window.
    let sends = join_all(sockets.iter_mut().map(|ws| async move {
        ws.send(json!({"content": "hi"})).await;
        let first = ws.event().await;
        match first["event_type"].as_str() {
            Some("message_received") => {
                let end = ws.until("message_stream_ended").await;
                assert_eq!(end["finish_reason"], "length", "{end}");
                true
            }
            Some("error") => {
                assert_eq!(first["code"], "queue_full", "{first}");
                false
            }
            _ => panic!("{first}"),
        }
    }));
    let rest = join_all((0..100).map(|_| {
        let s = &s;
        let key = t.key.clone();
        async move {
            let t0 = Instant::now();
            let (st, v) = s.get("/api/v1/chats/user/u?limit=1", &key).await;
            assert!(t0.elapsed() < Duration::from_secs(10), "slow answer");
            match st.as_u16() {
                200 => true,
                429 => {
                    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
                    false
                }
                other => panic!("{other}: {v}"),
            }
        }
    }));
    let (accepted, ok) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(sends, rest) })
            .await
            .expect("bounded");
    let accepted = accepted.iter().filter(|a| **a).count();
    let ok = ok.iter().filter(|a| **a).count();
    assert_eq!(ok, 70, "exactly the rest of the minute's quota");
    assert!(
        accepted >= 17,
        "one running + 16 queued at least: {accepted}"
    );
    assert!(accepted < 50, "the queue bound refused some: {accepted}");

    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 256 * 1024, "memory grew by {grown} KiB");
    assert!(started.elapsed() < Duration::from_secs(60));
    s.stop().await;
}

backend_tests!(fifty_sockets_and_rest_at_the_limit);
