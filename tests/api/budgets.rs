//! Token budgets: refused before a reply starts, held while replies run (several at once
//! cannot overrun), per user, on the OpenAI API, reported at `/api/v1/usage`; usage per key.

use std::time::Duration;

use chrono::{Datelike, Utc};
use serde_json::{json, Value};

use crate::common::{assert_error, Backend, TestServer};
use crate::ws::{tiny_model_batched, Ws};
use confab::store::KeySpec;

const MAX_TOKENS: u64 = 8;

async fn server(b: Backend) -> (TestServer, String) {
    let mut settings = confab::ServerSettings::default();
    // Refusals are counted into the audit log over 200 ms windows.
    settings.audit.flush_interval = Duration::from_millis(200);
    // Paced so that replies overlap; four generated together.
    let model = tiny_model_batched(Some(Duration::from_millis(40)), 4);
    let s = TestServer::start_full(b, settings, model).await;
    let admin = confab::credentials::generate_admin();
    s.store
        .create_admin_key(&admin, &KeySpec::default())
        .await
        .unwrap();
    (s, admin.secret)
}

async fn chat(s: &TestServer, key: &str, user: &str) -> String {
    let c = s
        .create_chat(
            key,
            json!({"user_id": user, "config": {"temperature": 0, "max_tokens": MAX_TOKENS}}),
        )
        .await;
    c["id"].as_str().unwrap().to_string()
}

/// Sends "hi" in a new socket of `chat`; returns the socket and the first answer.
async fn send_hi(s: &TestServer, key: &str, user: &str, chat: &str) -> (Ws, Value) {
    let mut ws = Ws::connect(s, key, user, chat).await;
    ws.until("connection_established").await;
    ws.send(json!({"type": "message", "content": "hi"})).await;
    loop {
        let e = ws.event().await;
        match e["event_type"].as_str() {
            Some("message_received") | Some("error") => return (ws, e),
            _ => {}
        }
    }
}

async fn usage(s: &TestServer, key: &str, query: &str) -> Value {
    let (st, v) = s.get(&format!("/api/v1/usage{query}"), key).await;
    assert_eq!(st.as_u16(), 200, "{v}");
    v
}

async fn budgets_hold_running_replies(b: Backend) {
    let (s, admin) = server(b).await;
    let t = s.tenant("acme").await;
    // One reply without a budget: what a first "hi" costs.
    let first = chat(&s, &t.key, "u").await;
    let (mut ws, got) = send_hi(&s, &t.key, "u", &first).await;
    assert_eq!(got["event_type"], "message_received", "{got}");
    let ended = ws.until("message_stream_ended").await;
    let prompt = ended["usage"]["prompt_tokens"].as_u64().unwrap();
    let spent = prompt + ended["usage"]["completion_tokens"].as_u64().unwrap();
    // Room for two more replies' holds (prompt + max_tokens each), not three.
    let hold = prompt + MAX_TOKENS;
    let limit = spent + 2 * hold + hold / 2;
    let (st, v) = s
        .patch(
            "/admin/v1/tenants/acme",
            &admin,
            json!({"budgets": {"tokens_per_day": limit}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(v["budgets"]["tokens_per_day"], limit);

    let mut chats = Vec::new();
    for _ in 0..5 {
        chats.push(chat(&s, &t.key, "u").await);
    }
    let mut running = Vec::new();
    let mut refused = Vec::new();
    for c in &chats {
        let (ws, got) = send_hi(&s, &t.key, "u", c).await;
        match got["event_type"].as_str() {
            Some("message_received") => running.push(ws),
            _ => refused.push((c.clone(), got)),
        }
    }
    assert_eq!(running.len(), 2, "two holds fit: {refused:?}");
    assert_eq!(refused.len(), 3);
    let midnight = (Utc::now().date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    for (c, e) in &refused {
        assert_eq!(e["code"], "quota_exceeded", "{e}");
        let d = &e["details"];
        assert_eq!(d["scope"], "tenant");
        assert_eq!(d["period"], "day");
        assert_eq!(d["limit"], limit);
        assert_eq!(d["requested"], hold, "the real prompt plus max_tokens: {e}");
        let resets: chrono::DateTime<Utc> = d["resets_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(resets, midnight);
        assert!(d["retry_after_ms"].as_u64().unwrap() > 0);
        // A refused message is not stored.
        let (_, m) = s.get(&format!("/api/v1/chats/{c}/messages"), &t.key).await;
        assert_eq!(m["total"], 0, "{m}");
    }
    // While they run, the report shows what they hold.
    let now = usage(&s, &t.key, "").await;
    let day = &now["budgets"][0];
    assert_eq!(day["period"], "day");
    assert_eq!(day["held"], 2 * hold, "{now}");
    for mut ws in running {
        ws.until("message_stream_ended").await;
    }
    // Once they ended: nothing held, and the budget was not overrun.
    let mut after = Value::Null;
    for _ in 0..50 {
        after = usage(&s, &t.key, "").await;
        if after["budgets"][0]["held"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let day = &after["budgets"][0];
    assert_eq!(day["held"], 0, "{after}");
    let used = day["used"].as_u64().unwrap();
    assert!(used <= limit, "{used} > {limit}");
    assert_eq!(day["remaining"], limit - used);
    assert_eq!(
        used,
        after["totals"]["prompt_tokens"].as_u64().unwrap()
            + after["totals"]["completion_tokens"].as_u64().unwrap()
    );

    // The OpenAI API is held to the same budget, in OpenAI's words.
    let (st, v) = s
        .patch(
            "/admin/v1/tenants/acme",
            &admin,
            json!({"budgets": {"tokens_per_day": used + 1}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(&t.key)
        .json(&json!({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    // The model id is checked first; ask for the served one.
    let model = if resp.status().as_u16() == 404 {
        let (_, models) = s.get("/v1/models", &t.key).await;
        models["data"][0]["id"].as_str().unwrap().to_string()
    } else {
        "x".into()
    };
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(&t.key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
    assert_eq!(v["error"]["type"], "insufficient_quota", "{v}");

    // Removing the budget lets replies through again.
    let (st, _) = s
        .patch(
            "/admin/v1/tenants/acme",
            &admin,
            json!({"budgets": {"tokens_per_day": null}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200);
    let (_, got) = send_hi(&s, &t.key, "u", &refused[0].0).await;
    assert_eq!(got["event_type"], "message_received", "{got}");
    assert_eq!(usage(&s, &t.key, "").await["budgets"], json!([]));
    s.stop().await;
}

async fn user_budgets_and_periods(b: Backend) {
    let (s, admin) = server(b).await;
    let t = s.tenant("acme").await;
    let (st, v) = s
        .patch(
            "/admin/v1/tenants/acme",
            &admin,
            json!({"budgets": {"user_tokens_per_day": 1000, "tokens_per_month": 1_000_000}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    // Yesterday's usage does not count against today (the day budget has reset), but does
    // against the month when yesterday was in it.
    let today = Utc::now().date_naive();
    let yesterday = today.pred_opt().unwrap();
    s.store
        .tenant(t.id)
        .record_usage("heavy", uuid::Uuid::new_v4(), yesterday, 5000, 5000)
        .await
        .unwrap();
    let report = usage(&s, &t.key, "?user_id=heavy").await;
    let budgets = report["budgets"].as_array().unwrap();
    let find = |scope: &str, period: &str| {
        budgets
            .iter()
            .find(|b| b["scope"] == scope && b["period"] == period)
            .cloned()
            .unwrap_or_else(|| panic!("no {scope}/{period} in {report}"))
    };
    assert_eq!(find("user", "day")["used"], 0);
    assert_eq!(find("user", "day")["user_id"], "heavy");
    let month_used = if yesterday.month() == today.month() {
        10_000
    } else {
        0
    };
    assert_eq!(find("tenant", "month")["used"], month_used);
    // Today: a user over the user budget is refused, another user is not.
    s.store
        .tenant(t.id)
        .record_usage("heavy", uuid::Uuid::new_v4(), today, 990, 0)
        .await
        .unwrap();
    let c1 = chat(&s, &t.key, "heavy").await;
    let (_, got) = send_hi(&s, &t.key, "heavy", &c1).await;
    assert_eq!(got["code"], "quota_exceeded", "{got}");
    assert_eq!(got["details"]["scope"], "user");
    assert_eq!(got["details"]["used"], 990);
    let (_, again) = send_hi(&s, &t.key, "heavy", &c1).await;
    assert_eq!(again["code"], "quota_exceeded", "{again}");
    // The refusals reach the audit log counted, per user and budget.
    let mut refused = Value::Null;
    for _ in 0..50 {
        let (st, v) = s.get("/admin/v1/audit?action=budget.refuse", &admin).await;
        assert_eq!(st.as_u16(), 200, "{v}");
        let n: u64 = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["details"]["count"].as_u64().unwrap())
            .sum();
        if n >= 2 {
            refused = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = &refused["records"][0];
    assert_eq!(r["tenant_name"], "acme", "{refused}");
    assert_eq!(r["target"], "user:heavy");
    assert_eq!(r["details"]["scope"], "user");
    assert_eq!(r["details"]["period"], "day");
    assert_eq!(r["details"]["limit"], 1000);
    let c2 = chat(&s, &t.key, "light").await;
    let (mut ws, got) = send_hi(&s, &t.key, "light", &c2).await;
    assert_eq!(got["event_type"], "message_received", "{got}");
    ws.until("message_stream_ended").await;
    // Bad budgets are refused.
    for bad in [
        json!({"budgets": {"tokens_per_day": 0}}),
        json!({"budgets": {"tokens_per_day": -5}}),
        json!({"budgets": {"user_tokens_per_month": "lots"}}),
    ] {
        let (st, v) = s.patch("/admin/v1/tenants/acme", &admin, bad).await;
        assert_error(st, &v, 400, "validation_error");
    }
    s.stop().await;
}

async fn usage_is_recorded_per_key(b: Backend) {
    let (s, admin) = server(b).await;
    let t = s.tenant("acme").await;
    let (st, created) = s
        .post(
            "/admin/v1/tenants/acme/keys",
            &admin,
            json!({"name": "second"}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{created}");
    let second = created["api_key"].as_str().unwrap().to_string();
    let (_, keys) = s.get("/admin/v1/tenants/acme/keys", &admin).await;
    let id_of = |secret: &str| {
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| secret.starts_with(k["prefix"].as_str().unwrap()))
            .map(|k| k["id"].as_str().unwrap().to_string())
            .unwrap()
    };
    let mut expected = std::collections::HashMap::new();
    for (key, replies) in [(&t.key, 2), (&second, 1)] {
        let c = chat(&s, key, "u").await;
        let mut ws = Ws::connect(&s, key, "u", &c).await;
        ws.until("connection_established").await;
        for _ in 0..replies {
            ws.send(json!({"type": "message", "content": "hi"})).await;
            let end = ws.until("message_stream_ended").await;
            let e = expected.entry(id_of(key)).or_insert((0u64, 0u64, 0u64));
            e.0 += end["usage"]["prompt_tokens"].as_u64().unwrap();
            e.1 += end["usage"]["completion_tokens"].as_u64().unwrap();
            e.2 += 1;
        }
    }
    let mut report = Value::Null;
    for _ in 0..50 {
        report = usage(&s, &t.key, "").await;
        if report["keys"].as_array().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got: std::collections::HashMap<String, (u64, u64, u64)> = report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_string(),
                (
                    k["prompt_tokens"].as_u64().unwrap(),
                    k["completion_tokens"].as_u64().unwrap(),
                    k["replies"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, expected, "{report}");

    // The operator's report says the same, broken down each way.
    let (st, by_key) = s.get("/admin/v1/usage?group_by=key", &admin).await;
    assert_eq!(st.as_u16(), 200, "{by_key}");
    let rows: std::collections::HashMap<String, (u64, u64, u64)> = by_key["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["tenant"], "acme");
            (
                r["key_id"].as_str().unwrap().to_string(),
                (
                    r["prompt_tokens"].as_u64().unwrap(),
                    r["completion_tokens"].as_u64().unwrap(),
                    r["replies"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(rows, expected);
    let total = expected
        .values()
        .fold((0, 0, 0), |a, e| (a.0 + e.0, a.1 + e.1, a.2 + e.2));
    let today = Utc::now().date_naive().to_string();
    for (group, field, value) in [
        ("tenant", "tenant_id", json!(t.id.to_string())),
        ("user", "user_id", json!("u")),
        ("day", "day", json!(today)),
    ] {
        let (_, v) = s
            .get(
                &format!("/admin/v1/usage?group_by={group}&tenant=acme"),
                &admin,
            )
            .await;
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{group}: {v}");
        assert_eq!(rows[0][field], value, "{v}");
        assert_eq!(
            (
                rows[0]["prompt_tokens"].as_u64().unwrap(),
                rows[0]["completion_tokens"].as_u64().unwrap(),
                rows[0]["replies"].as_u64().unwrap()
            ),
            total
        );
    }
    let (st, v) = s.get("/admin/v1/usage?tenant=ghost", &admin).await;
    assert_error(st, &v, 404, "tenant_not_found");
    let (st, v) = s
        .get("/admin/v1/usage?from=2026-01-10&to=2026-01-01", &admin)
        .await;
    assert_error(st, &v, 400, "validation_error");
    s.stop().await;
}

crate::backend_tests!(
    budgets_hold_running_replies,
    user_budgets_and_periods,
    usage_is_recorded_per_key,
);
