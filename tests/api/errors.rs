//! Every kind of bad request gets the one error shape with a specific code.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{assert_error, Backend, TestServer};

async fn raw(
    s: &TestServer,
    method: Method,
    path: &str,
    key: &str,
    ct: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = s
        .http
        .request(method, format!("{}{}", s.base, path))
        .header("X-API-Key", key)
        .body(body);
    if let Some(ct) = ct {
        req = req.header("Content-Type", ct);
    }
    let resp = req.send().await.unwrap();
    let st = resp.status();
    let ct_back = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.unwrap();
    assert!(
        ct_back.starts_with("application/json"),
        "error bodies are JSON, got {ct_back:?}: {text}"
    );
    (
        st,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

async fn bad_requests(b: Backend) {
    let s = TestServer::start_with(
        b,
        confab::ServerSettings {
            limits: confab::domain::Limits {
                max_body_bytes: 4096,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let t = s.tenant("acme").await;
    let k = t.key.as_str();
    let json_ct = Some("application/json");

    let (st, v) = raw(
        &s,
        Method::POST,
        "/api/v1/chats/",
        k,
        json_ct,
        b"{\"user_id\": ".to_vec(),
    )
    .await;
    let d = assert_error(st, &v, 400, "invalid_json");
    assert_eq!(d["line"], 1);
    let (st, v) = raw(&s, Method::POST, "/api/v1/chats/", k, json_ct, b"".to_vec()).await;
    assert_error(st, &v, 400, "invalid_json");
    let (st, v) = raw(
        &s,
        Method::POST,
        "/api/v1/chats/",
        k,
        json_ct,
        b"[1,2]".to_vec(),
    )
    .await;
    assert_error(st, &v, 400, "validation_error");
    let (st, v) = raw(
        &s,
        Method::POST,
        "/api/v1/chats/",
        k,
        Some("text/plain"),
        b"hello".to_vec(),
    )
    .await;
    let d = assert_error(st, &v, 415, "unsupported_media_type");
    assert_eq!(d["expected"], "application/json");
    let (st, v) = raw(
        &s,
        Method::POST,
        "/api/v1/chats/",
        k,
        None,
        b"{\"user_id\":\"u\"}".to_vec(),
    )
    .await;
    assert_error(st, &v, 415, "unsupported_media_type");
    let big = format!("{{\"user_id\":\"u\",\"title\":\"{}\"}}", "x".repeat(5000));
    let (st, v) = raw(
        &s,
        Method::POST,
        "/api/v1/chats/",
        k,
        json_ct,
        big.into_bytes(),
    )
    .await;
    let d = assert_error(st, &v, 413, "payload_too_large");
    assert_eq!(d["max_bytes"], 4096);

    let bad_bodies = [
        (json!({}), "user_id missing"),
        (json!({"user_id": 42}), "user_id not a string"),
        (json!({"user_id": ""}), "empty user_id"),
        (json!({"user_id": "x".repeat(129)}), "user_id too long"),
        (json!({"user_id": "two words"}), "whitespace"),
        (json!({"user_id": "a/b"}), "slash"),
        (
            json!({"user_id": "u", "title": "x".repeat(257)}),
            "title too long",
        ),
        (
            json!({"user_id": "u", "title": "line\nbreak"}),
            "control char in title",
        ),
        (
            json!({"user_id": "u", "metadata": [1]}),
            "metadata not an object",
        ),
        (
            json!({"user_id": "u", "metadata": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}),
            "metadata too deep",
        ),
        (
            json!({"user_id": "u", "config": {"temperature": -0.1}}),
            "temperature",
        ),
        (json!({"user_id": "u", "config": {"top_p": 0}}), "top_p"),
        (json!({"user_id": "u", "config": {"top_k": 0}}), "top_k"),
        (
            json!({"user_id": "u", "config": {"max_tokens": 0}}),
            "max_tokens",
        ),
        (json!({"user_id": "u", "config": {"seed": -1}}), "seed"),
        (
            json!({"user_id": "u", "config": {"stop": ["a","b","c","d","e","f","g","h","i"]}}),
            "too many stops",
        ),
    ];
    for (body, why) in bad_bodies {
        let (st, v) = s.post("/api/v1/chats/", k, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{why}: {v}");
        assert_error(st, &v, 400, "validation_error");
    }
    // Boundaries that are allowed.
    let (st, v) = s
        .post(
            "/api/v1/chats/",
            k,
            json!({"user_id": "x".repeat(128), "title": "t".repeat(256)}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = s
        .post(
            "/api/v1/chats/",
            k,
            json!({"user_id": "u", "config": {"temperature": 0, "top_p": 1, "max_tokens": 32768}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // Nothing else was created by the failures.
    let (_, v) = s.get("/api/v1/chats/user/u", k).await;
    assert_eq!(v["total"], 1);

    let (st, v) = s.get("/api/v1/chats/not-a-uuid", k).await;
    let d = assert_error(st, &v, 400, "validation_error");
    assert_eq!(d["parameter"], "chat_id");
    let (st, v) = s
        .get("/api/v1/chats/00000000-0000-0000-0000-000000000000", k)
        .await;
    let d = assert_error(st, &v, 404, "chat_not_found");
    assert_eq!(d["chat_id"], "00000000-0000-0000-0000-000000000000");
    let (st, v) = s.get("/api/v1/nothing/here", k).await;
    assert_error(st, &v, 404, "not_found");
    let (st, v) = s.call(Method::GET, "/nope", None, None).await;
    assert_error(st, &v, 404, "not_found");
    let (st, v) = s
        .call(
            Method::PUT,
            "/api/v1/chats/00000000-0000-0000-0000-000000000000",
            Some(k),
            Some(json!({})),
        )
        .await;
    assert_error(st, &v, 405, "method_not_allowed");
    let (st, v) = s
        .call(Method::DELETE, "/api/v1/chats/", Some(k), None)
        .await;
    assert_error(st, &v, 405, "method_not_allowed");
    // A 405 says what the path does accept (RFC 9110), in the header and the details,
    // for the documented operations and the routes outside the document alike.
    for (method, path, allowed) in [
        ("TRACE", "/api/v1/chats", "POST"),
        (
            "PUT",
            "/api/v1/chats/00000000-0000-0000-0000-000000000000",
            "DELETE, GET, PATCH",
        ),
        ("POST", "/metrics", "GET"),
        ("GET", "/v1/chat/completions", "POST"),
    ] {
        let r = s
            .http
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", s.base),
            )
            .header("X-API-Key", k)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(r.headers()["allow"], allowed, "{method} {path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["error"]["details"]["allowed"].as_array().unwrap().len(),
            allowed.split(", ").count()
        );
    }
    s.stop().await;
}

crate::backend_tests!(bad_requests);
