//! `/admin/v1`: admin keys kept apart from tenant keys, tenants and their keys over the API,
//! a disabled tenant losing its keys and sockets, a deleted tenant losing its data.

use std::time::Duration;

use chrono::{NaiveDate, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{assert_error, Backend, TestServer};
use crate::ws::Ws;
use confab::store::KeySpec;

/// Adds an admin key to the server's database; returns its secret.
async fn admin_key(s: &TestServer, spec: KeySpec) -> String {
    let key = confab::credentials::generate_admin();
    s.store
        .create_admin_key(&key, &spec)
        .await
        .expect("admin key");
    key.secret
}

async fn key_kinds_are_kept_apart(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let admin = admin_key(&s, KeySpec::default()).await;
    assert!(admin.starts_with("cfa_"));

    // A tenant key on the admin API, an admin key on the tenant API: 403 both ways.
    let (st, v) = s.get("/admin/v1/tenants", &t.key).await;
    let d = assert_error(st, &v, 403, "forbidden");
    assert_eq!(d["needs"], "admin_key");
    let (st, v) = s
        .post("/admin/v1/tenants", &t.key, json!({"name": "x"}))
        .await;
    assert_error(st, &v, 403, "forbidden");
    let (st, v) = s.get("/api/v1/chats/user/u", &admin).await;
    let d = assert_error(st, &v, 403, "forbidden");
    assert_eq!(d["needs"], "tenant_key");
    let resp = s
        .http
        .get(format!("{}/v1/models", s.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    let chat = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let mut ws = Ws::connect(&s, &admin, "u", chat["id"].as_str().unwrap()).await;
    ws.refused("forbidden", 4403).await;

    // Missing and unknown keys on the admin API.
    let (st, v) = s.call(Method::GET, "/admin/v1/tenants", None, None).await;
    assert_error(st, &v, 401, "missing_api_key");
    let (st, v) = s.get("/admin/v1/tenants", "cfa_nothing").await;
    assert_error(st, &v, 401, "invalid_api_key");

    // The admin key works where it belongs.
    let (st, v) = s.get("/admin/v1/tenants", &admin).await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(v["tenants"][0]["name"], "acme");
    assert_eq!(v["total"], 1);

    // An expiring admin key stops at its time.
    let soon = admin_key(
        &s,
        KeySpec {
            name: Some("short".into()),
            expires_at: Some(Utc::now() + chrono::Duration::milliseconds(1500)),
        },
    )
    .await;
    let (st, _) = s.get("/admin/v1/tenants", &soon).await;
    assert_eq!(st.as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (st, v) = s.get("/admin/v1/tenants", &soon).await;
    assert_error(st, &v, 401, "api_key_expired");
    s.stop().await;
}

async fn tenants_over_the_api(b: Backend) {
    let s = TestServer::start(b).await;
    let admin = admin_key(&s, KeySpec::default()).await;
    let (st, v) = s
        .post(
            "/admin/v1/tenants",
            &admin,
            json!({"name": "acme", "limits": {"requests_per_minute": 100}}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{v}");
    let secret = v["api_key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("cfk_"));
    let acme = v["tenant"].clone();
    assert_eq!(acme["name"], "acme");
    assert_eq!(acme["active_keys"], 1);
    assert_eq!(acme["disabled"], false);
    assert_eq!(
        acme["limits"],
        json!({"requests_per_minute": 100, "ws_messages_per_second": null, "max_connections": null})
    );
    assert_eq!(v["key"]["tenant_id"], acme["id"]);
    assert_eq!(v["key"]["state"], "active");
    // The new key works at once.
    let (st, _) = s.get("/api/v1/chats/user/u", &secret).await;
    assert_eq!(st.as_u16(), 200);

    // Refusals: taken name, bad name, bad limits.
    let (st, v) = s
        .post("/admin/v1/tenants", &admin, json!({"name": "acme"}))
        .await;
    assert_error(st, &v, 409, "conflict");
    for bad in [
        json!({"name": "bad name!"}),
        json!({"name": ""}),
        json!({"name": "x".repeat(65)}),
        json!({"name": "ok", "limits": {"max_connections": 0}}),
        json!({}),
    ] {
        let (st, v) = s.post("/admin/v1/tenants", &admin, bad.clone()).await;
        assert_error(st, &v, 400, "validation_error");
    }

    // Paging, oldest first.
    for name in ["b1", "b2", "b3"] {
        let (st, _) = s
            .post("/admin/v1/tenants", &admin, json!({"name": name}))
            .await;
        assert_eq!(st.as_u16(), 201);
    }
    let (_, p) = s.get("/admin/v1/tenants?limit=2", &admin).await;
    let names: Vec<&str> = p["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "b1"]);
    assert_eq!(
        (p["total"].as_u64(), p["has_more"].as_bool()),
        (Some(4), Some(true))
    );
    let (_, p) = s.get("/admin/v1/tenants?offset=2&limit=2", &admin).await;
    assert_eq!(p["tenants"][1]["name"], "b3");
    assert_eq!(p["has_more"], false);

    // Get by name and by id; unknown ones.
    let id = acme["id"].as_str().unwrap();
    let (_, by_name) = s.get("/admin/v1/tenants/acme", &admin).await;
    let (_, by_id) = s.get(&format!("/admin/v1/tenants/{id}"), &admin).await;
    assert_eq!(by_name, acme);
    assert_eq!(by_id, acme);
    let (st, v) = s.get("/admin/v1/tenants/nobody", &admin).await;
    let d = assert_error(st, &v, 404, "tenant_not_found");
    assert_eq!(d["tenant"], "nobody");

    // Rename and limits; null goes back to the default; absent stays.
    let (st, v) = s
        .patch(
            "/admin/v1/tenants/acme",
            &admin,
            json!({"name": "acme-corp", "limits": {"requests_per_minute": null, "max_connections": 3}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(v["name"], "acme-corp");
    assert_eq!(v["id"], acme["id"]);
    assert_eq!(
        v["limits"],
        json!({"requests_per_minute": null, "ws_messages_per_second": null, "max_connections": 3})
    );
    let (st, v) = s
        .patch("/admin/v1/tenants/acme-corp", &admin, json!({"name": "b1"}))
        .await;
    assert_error(st, &v, 409, "conflict");
    let (st, v) = s
        .patch("/admin/v1/tenants/acme", &admin, json!({"name": "x"}))
        .await;
    assert_error(st, &v, 404, "tenant_not_found");
    // The key still works under the new name: same tenant.
    let (st, _) = s.get("/api/v1/chats/user/u", &secret).await;
    assert_eq!(st.as_u16(), 200);
    s.stop().await;
}

async fn keys_over_the_api(b: Backend) {
    let s = TestServer::start(b).await;
    let admin = admin_key(&s, KeySpec::default()).await;
    let acme = s.tenant("acme").await;
    let other = s.tenant("other").await;
    let (st, v) = s
        .post(
            "/admin/v1/tenants/acme/keys",
            &admin,
            json!({"name": "billing export", "expires_at": "2099-01-31T00:00:00Z"}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{v}");
    let secret = v["api_key"].as_str().unwrap().to_string();
    let key = v["key"].clone();
    assert_eq!(key["name"], "billing export");
    assert_eq!(key["expires_at"], "2099-01-31T00:00:00.000Z");
    assert_eq!(key["state"], "active");
    assert_eq!(key["last_used_at"], Value::Null);
    let (st, _) = s.get("/api/v1/chats/user/u", &secret).await;
    assert_eq!(st.as_u16(), 200);

    let (_, list) = s.get("/admin/v1/tenants/acme/keys", &admin).await;
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["id"], key["id"], "newest first");
    assert!(!list.to_string().contains(&secret));
    assert!(!list.to_string().contains(&acme.key));

    // Refusals.
    for bad in [
        json!({"expires_at": "2001-01-01T00:00:00Z"}),
        json!({"expires_at": "soon"}),
        json!({"name": ""}),
        json!({"name": "tab\there"}),
        json!({"name": "x".repeat(101)}),
    ] {
        let (st, v) = s
            .post("/admin/v1/tenants/acme/keys", &admin, bad.clone())
            .await;
        assert_error(st, &v, 400, "validation_error");
    }
    let (st, v) = s
        .post("/admin/v1/tenants/ghost/keys", &admin, json!({}))
        .await;
    assert_error(st, &v, 404, "tenant_not_found");

    // Revoking: at once (this server forgets the cached key), only through its tenant.
    let key_id = key["id"].as_str().unwrap();
    let (st, v) = s
        .delete(&format!("/admin/v1/tenants/other/keys/{key_id}"), &admin)
        .await;
    assert_error(st, &v, 404, "api_key_not_found");
    let (st, v) = s
        .delete(&format!("/admin/v1/tenants/acme/keys/{key_id}"), &admin)
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(v["state"], "revoked");
    assert!(v["revoked_at"].is_string());
    assert!(v["last_used_at"].is_string(), "used above: {v}");
    let (st, v) = s.get("/api/v1/chats/user/u", &secret).await;
    assert_error(st, &v, 401, "invalid_api_key");
    // Again: nothing changes.
    let (st, again) = s
        .delete(&format!("/admin/v1/tenants/acme/keys/{key_id}"), &admin)
        .await;
    assert_eq!(st.as_u16(), 200);
    assert_eq!(again["revoked_at"], v_revoked_at(&s, &admin, key_id).await);
    let (st, v) = s
        .delete(
            &format!("/admin/v1/tenants/acme/keys/{}", uuid::Uuid::new_v4()),
            &admin,
        )
        .await;
    assert_error(st, &v, 404, "api_key_not_found");
    let (_, t) = s.get("/admin/v1/tenants/acme", &admin).await;
    assert_eq!(t["active_keys"], 1);
    // The other keys are untouched.
    for k in [&acme.key, &other.key] {
        let (st, _) = s.get("/api/v1/chats/user/u", k).await;
        assert_eq!(st.as_u16(), 200);
    }
    s.stop().await;
}

async fn v_revoked_at(s: &TestServer, admin: &str, key_id: &str) -> Value {
    let (_, list) = s.get("/admin/v1/tenants/acme/keys", admin).await;
    list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id)
        .map(|k| k["revoked_at"].clone())
        .unwrap()
}

fn quick_checks() -> confab::ServerSettings {
    let mut settings = confab::ServerSettings::default();
    settings.chat.tenant_check_interval = Duration::from_millis(200);
    settings
}

async fn disabled_tenant_loses_keys_and_sockets(b: Backend) {
    let s = TestServer::start_with(b, quick_checks()).await;
    let admin = admin_key(&s, KeySpec::default()).await;
    let acme = s.tenant("acme").await;
    let other = s.tenant("other").await;
    let chat = s.create_chat(&acme.key, json!({"user_id": "u"})).await;
    let chat_id = chat["id"].as_str().unwrap().to_string();
    let other_chat = s.create_chat(&other.key, json!({"user_id": "u"})).await;
    let mut open = Ws::connect(&s, &acme.key, "u", &chat_id).await;
    open.until("connection_established").await;
    let mut bystander = Ws::connect(&s, &other.key, "u", other_chat["id"].as_str().unwrap()).await;
    bystander.until("connection_established").await;

    // Through the API: at once.
    let (st, t) = s
        .post("/admin/v1/tenants/acme/disable", &admin, json!(null))
        .await;
    assert_eq!(st.as_u16(), 200, "{t}");
    assert_eq!(t["disabled"], true);
    open.refused("tenant_disabled", 4403).await;
    let (st, v) = s.get("/api/v1/chats/user/u", &acme.key).await;
    let d = assert_error(st, &v, 403, "tenant_disabled");
    assert_eq!(d["disabled_at"], t["disabled_at"]);
    let mut refused = Ws::connect(&s, &acme.key, "u", &chat_id).await;
    refused.refused("tenant_disabled", 4403).await;
    // Disabling again keeps the first time.
    let (_, again) = s
        .post("/admin/v1/tenants/acme/disable", &admin, json!(null))
        .await;
    assert_eq!(again["disabled_at"], t["disabled_at"]);
    // The other tenant did not notice.
    bystander.send(json!({"type": "ping"})).await;
    assert_eq!(bystander.until("pong").await["event_type"], "pong");
    let (st, _) = s.get("/api/v1/chats/user/u", &other.key).await;
    assert_eq!(st.as_u16(), 200);

    // Enabled again: keys and data are as they were.
    let (st, t) = s
        .post("/admin/v1/tenants/acme/enable", &admin, json!(null))
        .await;
    assert_eq!(st.as_u16(), 200);
    assert_eq!(t["disabled"], false);
    let (st, v) = s.get(&format!("/api/v1/chats/{chat_id}"), &acme.key).await;
    assert_eq!(st.as_u16(), 200, "{v}");
    let mut back = Ws::connect(&s, &acme.key, "u", &chat_id).await;
    back.until("connection_established").await;

    // Behind the server's back (the command line): within the tenant check interval.
    s.store
        .set_tenant_disabled("acme", true)
        .await
        .expect("disable");
    back.refused("tenant_disabled", 4403).await;
    s.stop().await;
}

async fn deleting_a_tenant_deletes_its_data(b: Backend) {
    let s = TestServer::start_with(b, quick_checks()).await;
    let admin = admin_key(&s, KeySpec::default()).await;
    let acme = s.tenant("acme").await;
    let other = s.tenant("other").await;
    let day = NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
    let mut chats = Vec::new();
    for t in [&acme, &other] {
        let c = s.create_chat(&t.key, json!({"user_id": "u"})).await;
        let id = c["id"].as_str().unwrap().to_string();
        s.add_messages(t.id, &id, 4).await;
        s.store
            .tenant(t.id)
            .record_usage("u", uuid::Uuid::new_v4(), day, 10, 20)
            .await
            .unwrap();
        chats.push(id);
    }
    let mut open = Ws::connect(&s, &acme.key, "u", &chats[0]).await;
    open.until("connection_established").await;

    let (st, v) = s.delete("/admin/v1/tenants/acme", &admin).await;
    assert_eq!(st.as_u16(), 204, "{v}");
    open.refused("invalid_api_key", 4401).await;
    let (st, v) = s.get("/api/v1/chats/user/u", &acme.key).await;
    assert_error(st, &v, 401, "invalid_api_key");
    let (st, v) = s.get("/admin/v1/tenants/acme", &admin).await;
    assert_error(st, &v, 404, "tenant_not_found");
    // Nothing of it is left in the database; the other tenant's data is whole.
    let gone = s.store.tenant(acme.id);
    let chat0 = chats[0].parse().unwrap();
    assert!(matches!(
        gone.get_chat(chat0).await,
        Err(confab::store::StoreError::NotFound)
    ));
    assert!(gone.usage(day, day, None).await.unwrap().is_empty());
    let kept = s.store.tenant(other.id);
    assert_eq!(kept.usage(day, day, None).await.unwrap().len(), 1);
    let (st, v) = s
        .get(&format!("/api/v1/chats/{}/messages", chats[1]), &other.key)
        .await;
    assert_eq!(st.as_u16(), 200);
    assert_eq!(v["total"], 4);
    // A new tenant may take the name.
    let (st, _) = s
        .post("/admin/v1/tenants", &admin, json!({"name": "acme"}))
        .await;
    assert_eq!(st.as_u16(), 201);
    s.stop().await;
}

async fn admin_page_is_served(b: Backend) {
    let s = TestServer::start(b).await;
    for (path, kind, needle) in [
        ("/admin", "text/html", "/assets/admin.js"),
        (
            "/assets/admin.js",
            "text/javascript",
            "/admin/v1/usage?group_by=day",
        ),
        ("/assets/admin.css", "text/css", ".usage-chart"),
        ("/assets/common.js", "text/javascript", "function request("),
        ("/", "text/html", "/assets/markdown.js"),
        ("/assets/markdown.js", "text/javascript", "never innerHTML"),
        // Both pages link their icon, which is served (no 404 in the console).
        ("/", "text/html", "href=\"/assets/favicon.svg\""),
        ("/admin", "text/html", "href=\"/assets/favicon.svg\""),
        ("/assets/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let r = s
            .http
            .get(format!("{}{path}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let h = r.headers().clone();
        let ct = h["content-type"].to_str().unwrap();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        // The page's own scripts and styles only: no inline code, no other origin.
        assert_eq!(
            h["content-security-policy"].to_str().unwrap(),
            confab::web::CSP,
            "{path}"
        );
        let body = r.text().await.unwrap();
        assert!(body.contains(needle), "{path}");
        assert!(
            !body.contains("http://") || path != "/admin",
            "no remote assets"
        );
    }
    s.stop().await;
}

crate::backend_tests!(
    admin_page_is_served,
    key_kinds_are_kept_apart,
    tenants_over_the_api,
    keys_over_the_api,
    disabled_tenant_loses_keys_and_sockets,
    deleting_a_tenant_deletes_its_data,
);
