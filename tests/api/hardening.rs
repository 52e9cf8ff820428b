//! The attacks of an afternoon, each against the real server on loopback: connections that
//! never finish a request or a body, connection floods, `//api` paths, forged request ids,
//! prompt storms, a locked database under a streaming reply, open metrics.
//!
//! Loops are bounded by counts and by time; no test waits longer than its timeouts need.

use std::time::{Duration, Instant};

use confab::server::ConnectionLimits;
use confab::ServerSettings;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend_tests;
use crate::common::{assert_error, Backend, TestServer};

fn addr(s: &TestServer) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (EOF or reset) or `limit` passes; returns
/// what was read and whether it closed.
async fn read_until_closed(c: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn quick_timeouts() -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        min_body_bytes_per_sec: 1024 * 1024,
        ..ConnectionLimits::default()
    }
}

async fn slowloris_and_idle_connections_are_closed_after_the_header_timeout(b: Backend) {
    let settings = ServerSettings {
        connections: quick_timeouts(),
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let started = Instant::now();
    let mut idle = TcpStream::connect(addr(&s)).await.unwrap();
    let mut slow = TcpStream::connect(addr(&s)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A header line every 300 ms: never finishing, always sending.
    let trickle = tokio::spawn(async move {
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return true;
            }
        }
        false
    });
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(closed, "an idle connection is closed");
    assert!(trickle.await.unwrap(), "a slowloris connection is closed");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A kept-alive connection goes after the same time without a new request.
    let mut kept = TcpStream::connect(addr(&s)).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut kept, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "idle keep-alive connection closed");
    s.stop().await;
}

async fn bodies_are_read_only_by_routes_that_take_them_and_only_so_slowly(b: Backend) {
    let settings = ServerSettings {
        connections: quick_timeouts(),
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let t = s.tenant("acme").await;
    // A public path: the declared megabyte is never waited for.
    let mut c = TcpStream::connect(addr(&s)).await.unwrap();
    c.write_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        closed,
        "the connection is not kept for the rest of the body"
    );
    // An API path without a key: refused before the body.
    let mut c = TcpStream::connect(addr(&s)).await.unwrap();
    c.write_all(b"POST /api/v1/chats HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // With a key, on an operation that takes no body: answered without waiting for it.
    let mut c = TcpStream::connect(addr(&s)).await.unwrap();
    let head = format!("POST /api/v1/usage HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{", t.key);
    c.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // With a key, a body slower than its deadline (1 s + 100 kB at 1 MiB/s) gets 408.
    let mut c = TcpStream::connect(addr(&s)).await.unwrap();
    let head = format!("POST /api/v1/chats HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{", t.key);
    c.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A request head that grows past the 64 KiB read buffer is refused, not buffered (hyper
    // checks while a head is incomplete, so one read may go past it: 200 kB is refused).
    let mut c = TcpStream::connect(addr(&s)).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(200_000)
    );
    for piece in head.as_bytes().chunks(4096) {
        if c.write_all(piece).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (answer, closed) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    s.stop().await;
}

async fn connections_over_the_per_address_cap_are_refused_at_once(b: Backend) {
    let settings = ServerSettings {
        connections: ConnectionLimits {
            max_connections_per_ip: 3,
            ..ConnectionLimits::default()
        },
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(TcpStream::connect(addr(&s)).await.unwrap());
    }
    let mut fourth = TcpStream::connect(addr(&s)).await.unwrap();
    let (answer, closed) = read_until_closed(&mut fourth, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON error body");
    assert_eq!(v["error"]["code"], "too_many_connections", "{v}");
    let declared: usize = answer
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(declared, body.len(), "Content-Length matches the body");
    // A place is given back when a connection closes.
    drop(open.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut c = TcpStream::connect(addr(&s)).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_until_closed(&mut c, Duration::from_secs(5)).await;
        if answer.starts_with("HTTP/1.1 200") {
            again = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a closed connection frees its place");
    s.stop().await;
}

async fn double_slashes_are_routed_and_counted_like_single_ones(b: Backend) {
    let settings = ServerSettings {
        quotas: confab::api::quota::QuotaDefaults {
            requests_per_minute: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let t = s.tenant("acme").await;
    for (i, path) in [
        "//api/v1/chats/user/u",
        "/api//v1/chats/user/u",
        "/x/../api/v1/chats/user/u",
    ]
    .iter()
    .enumerate()
    {
        let r = s
            .http
            .get(format!("{}{path}", s.base))
            .header("X-API-Key", &t.key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(
            r.headers()["x-ratelimit-remaining"].to_str().unwrap(),
            (2 - i).to_string(),
            "{path} is counted"
        );
    }
    let r = s
        .http
        .get(format!("{}//api/v1/chats/user/u", s.base))
        .header("X-API-Key", &t.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    // `//v1/models` without a key is a 401 in OpenAI's shape, not a 500.
    let r = s
        .http
        .get(format!("{}//v1/models", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "missing_api_key", "{v}");
    s.stop().await;
}

async fn request_ids_are_plain_tokens(b: Backend) {
    let s = TestServer::start(b).await;
    let echo = |id: &'static str| {
        let s = &s;
        async move {
            let r = s
                .http
                .get(format!("{}/healthz", s.base))
                .header("X-Request-ID", id)
                .send()
                .await
                .unwrap();
            r.headers()["x-request-id"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(echo("trace-1.2_3").await, "trace-1.2_3");
    for forged in ["a} status=200 path=/x", "k:v", "x=y", "a b"] {
        let got = echo(forged).await;
        assert!(uuid::Uuid::parse_str(&got).is_ok(), "{forged:?} → {got:?}");
    }
    s.stop().await;
}

async fn metrics_are_closed_on_a_public_address_without_a_token(b: Backend) {
    let settings = ServerSettings {
        metrics_open: false,
        ..Default::default()
    };
    let s = TestServer::start_with(b, settings).await;
    let r = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_error(status, &v, 403, "metrics_closed");
    s.stop().await;
}

/// One tenant sends megabyte prompts to the OpenAI API as fast as it can; another tenant's
/// reply keeps streaming at its pace (the refused prompts never reach the engine thread).
async fn a_prompt_storm_by_one_tenant_does_not_stall_another(b: Backend) {
    let pace = Duration::from_millis(20);
    let settings = ServerSettings {
        quotas: confab::api::quota::QuotaDefaults {
            requests_per_minute: 10_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = TestServer::start_full(b, settings, crate::ws::tiny_model(Some(pace))).await;
    let attacker = s.tenant("attacker").await;
    let victim = s.tenant("victim").await;
    let model = {
        let (st, v) = s.get("/v1/models", &victim.key).await;
        assert_eq!(st.as_u16(), 200, "{v}");
        v["data"][0]["id"].as_str().unwrap().to_string()
    };
    // Inter-token gaps of one streamed reply, with or without the storm.
    let gaps = |s: &TestServer| {
        let (http, base, key, model) = (
            s.http.clone(),
            s.base.clone(),
            victim.key.clone(),
            model.clone(),
        );
        async move {
            let mut r = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(
                    &json!({"model": model, "stream": true, "max_tokens": 40, "temperature": 0,
                    "messages": [{"role": "user", "content": "hello"}]}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut at = Vec::new();
            while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), r.chunk())
                .await
                .expect("a chunk in time")
                .unwrap()
            {
                if String::from_utf8_lossy(&chunk).contains("\"content\"") {
                    at.push(Instant::now());
                }
            }
            let mut g: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
            g.sort();
            g
        }
    };
    let p99 = |g: &[Duration]| g[(g.len() * 99 / 100).min(g.len() - 1)];
    let quiet = gaps(&s).await;
    assert!(quiet.len() >= 20, "{quiet:?}");
    let big = "x".repeat(1_000_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let (http, base, key, model, stop) = (
            s.http.clone(),
            s.base.clone(),
            attacker.key.clone(),
            model.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let body =
                json!({"model": model, "messages": [{"role": "user", "content": big}]}).to_string();
            let mut refused = 0;
            for _ in 0..500 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = http
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 400);
                let v: serde_json::Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
                refused += 1;
            }
            refused
        })
    };
    let loud = gaps(&s).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = storm.await.unwrap();
    assert!(refused >= 5, "the storm ran: {refused} prompts refused");
    assert!(
        p99(&loud) < p99(&quiet) * 2,
        "inter-token p99 {:?} under the storm vs {:?} quiet",
        p99(&loud),
        p99(&quiet)
    );
    s.stop().await;
}

backend_tests!(
    slowloris_and_idle_connections_are_closed_after_the_header_timeout,
    bodies_are_read_only_by_routes_that_take_them_and_only_so_slowly,
    connections_over_the_per_address_cap_are_refused_at_once,
    double_slashes_are_routed_and_counted_like_single_ones,
    request_ids_are_plain_tokens,
    metrics_are_closed_on_a_public_address_without_a_token,
    a_prompt_storm_by_one_tenant_does_not_stall_another,
);
