//! Per-tenant REST rate limits and their headers, per-tenant overrides (REST and WebSocket),
//! security headers and CORS.

use std::time::Duration;

use confab::domain::{Patch, TenantLimitsPatch};
use confab::ServerSettings;
use reqwest::header::HeaderMap;
use serde_json::json;

use crate::backend_tests;
use crate::common::{assert_error, Backend, TestServer};

fn settings(rpm: u32) -> ServerSettings {
    ServerSettings {
        quotas: confab::api::quota::QuotaDefaults {
            requests_per_minute: rpm,
            ..Default::default()
        },
        // Tenant overrides are re-read after this long.
        auth_cache_ttl: Duration::from_millis(100),
        ..Default::default()
    }
}

async fn get(s: &TestServer, path: &str, key: Option<&str>) -> (u16, HeaderMap, serde_json::Value) {
    let mut req = s.http.get(format!("{}{path}", s.base));
    if let Some(k) = key {
        req = req.header("X-API-Key", k);
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, body)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("{name} missing: {h:?}"))
        .to_str()
        .unwrap()
}

async fn rest_requests_are_limited_per_tenant_with_headers(b: Backend) {
    let s = TestServer::start_with(b, settings(5)).await;
    let a = s.tenant("a").await;
    let other = s.tenant("b").await;
    let path = "/api/v1/chats/user/u";
    for i in 0..5u32 {
        let (st, h, body) = get(&s, path, Some(&a.key)).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(header(&h, "x-ratelimit-limit"), "5");
        assert_eq!(header(&h, "x-ratelimit-remaining"), (4 - i).to_string());
        let reset: u64 = header(&h, "x-ratelimit-reset").parse().unwrap();
        assert!((1..=60).contains(&reset));
        assert_eq!(header(&h, "ratelimit-policy"), "\"tenant\";q=5;w=60");
        assert_eq!(
            header(&h, "ratelimit"),
            format!("\"tenant\";r={};t={reset}", 4 - i)
        );
    }
    // Errors count too, and carry the headers.
    let (st, h, body) = get(
        &s,
        "/api/v1/chats/00000000-0000-0000-0000-000000000000",
        Some(&a.key),
    )
    .await;
    assert_eq!(st, 429, "{body}");
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(header(&h, "x-ratelimit-remaining"), "0");
    let details = assert_error(
        reqwest::StatusCode::TOO_MANY_REQUESTS,
        &body,
        429,
        "rate_limited",
    );
    assert_eq!(details["limit_per_minute"], 5);
    assert_eq!(details["retry_after_seconds"], retry);
    // Another tenant has its own quota; requests without a working key are not counted.
    let (st, h, _) = get(&s, path, Some(&other.key)).await;
    assert_eq!(st, 200);
    assert_eq!(header(&h, "x-ratelimit-remaining"), "4");
    let (st, h, _) = get(&s, path, None).await;
    assert_eq!(st, 401);
    assert!(h.get("x-ratelimit-limit").is_none());
    // Probes are not rate limited.
    for _ in 0..10 {
        assert_eq!(get(&s, "/healthz", None).await.0, 200);
    }
    s.stop().await;
}

async fn a_tenant_can_have_its_own_limits(b: Backend) {
    let s = TestServer::start_with(b, settings(100)).await;
    let a = s.tenant("a").await;
    let t = s
        .store
        .set_tenant_limits(
            "a",
            TenantLimitsPatch {
                requests_per_minute: Patch::Set(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.limits.requests_per_minute, Some(2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let path = "/api/v1/chats/user/u";
    let (_, h, _) = get(&s, path, Some(&a.key)).await;
    assert_eq!(header(&h, "x-ratelimit-limit"), "2");
    get(&s, path, Some(&a.key)).await;
    assert_eq!(get(&s, path, Some(&a.key)).await.0, 429);
    // Back to the default.
    s.store
        .set_tenant_limits(
            "a",
            TenantLimitsPatch {
                requests_per_minute: Patch::Clear,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (st, h, _) = get(&s, path, Some(&a.key)).await;
    assert_eq!(st, 200);
    assert_eq!(header(&h, "x-ratelimit-limit"), "100");
    s.stop().await;
}

async fn responses_carry_security_headers_and_no_cors_by_default(b: Backend) {
    let s = TestServer::start_with(b, settings(100)).await;
    let a = s.tenant("a").await;
    for (path, key) in [
        ("/api/v1/chats/user/u", Some(a.key.as_str())),
        ("/healthz", None),
        ("/nope", None),
    ] {
        let (_, h, _) = get(&s, path, key).await;
        assert_eq!(header(&h, "x-content-type-options"), "nosniff");
        assert_eq!(header(&h, "x-frame-options"), "DENY");
        assert!(header(&h, "content-security-policy").contains("default-src 'none'"));
        assert!(h.get("access-control-allow-origin").is_none());
    }
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/api/v1/chats", s.base))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    s.stop().await;
}

async fn cors_allows_only_configured_origins(b: Backend) {
    let settings = ServerSettings {
        cors_origins: vec!["https://app.example".into()],
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let preflight = |origin: &'static str| {
        s.http
            .request(reqwest::Method::OPTIONS, format!("{}/api/v1/chats", s.base))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "x-api-key, content-type")
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers().get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    let bad = preflight("https://evil.example").await.unwrap();
    assert!(bad.headers().get("access-control-allow-origin").is_none());
    let a = s.tenant("a").await;
    let r = s
        .http
        .post(format!("{}/api/v1/chats", s.base))
        .header("Origin", "https://app.example")
        .header("X-API-Key", &a.key)
        .json(&json!({"user_id": "u"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(
        r.headers().get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    let exposed = r
        .headers()
        .get("access-control-expose-headers")
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .unwrap_or_default();
    assert!(exposed.contains("x-ratelimit-remaining"), "{exposed}");
    s.stop().await;
}

async fn every_response_has_a_request_id(b: Backend) {
    let s = TestServer::start_with(b, settings(100)).await;
    let a = s.tenant("a").await;
    let (_, h, _) = get(&s, "/healthz", None).await;
    let generated = header(&h, "x-request-id").to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let send = |id: &'static str| {
        s.http
            .get(format!("{}/api/v1/chats/user/u", s.base))
            .header("X-API-Key", &a.key)
            .header("X-Request-ID", id)
            .send()
    };
    let r = send("client-id-1").await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-1");
    // Not a sane token: replaced.
    let r = send("has space").await.unwrap();
    let got = r.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(got).is_ok(), "{got}");
    s.stop().await;
}

async fn metrics_can_require_a_token(b: Backend) {
    let settings = ServerSettings {
        metrics_token: Some("metrics-secret-123".into()),
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let url = format!("{}/metrics", s.base);
    let r = s.http.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = s.http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .http
        .get(&url)
        .bearer_auth("metrics-secret-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("confab_http_requests_total"));
    s.stop().await;
}

backend_tests!(
    metrics_can_require_a_token,
    every_response_has_a_request_id,
    rest_requests_are_limited_per_tenant_with_headers,
    a_tenant_can_have_its_own_limits,
    responses_carry_security_headers_and_no_cors_by_default,
    cors_allows_only_configured_origins,
);
