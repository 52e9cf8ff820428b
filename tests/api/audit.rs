//! The audit log: every operator action (API and command line) with its actor, key
//! expiries recorded once, failed authentications counted per address and reason rather
//! than one row each, filters and paging, and the retention sweep.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};

use crate::common::{assert_error, Backend, TestServer};
use crate::ws::Ws;
use confab::domain::{Actor, AuditAction};
use confab::store::{AuditRecord, KeySpec};

/// A server that writes its counts (and looks for expiries) every 200 ms.
fn quick_audit() -> confab::ServerSettings {
    let mut settings = confab::ServerSettings::default();
    settings.audit.flush_interval = Duration::from_millis(200);
    settings
}

/// Adds an admin key; returns its secret and id.
async fn admin_key(s: &TestServer, spec: KeySpec) -> (String, String) {
    let key = confab::credentials::generate_admin();
    let k = s.store.create_admin_key(&key, &spec).await.unwrap();
    (key.secret, k.id.to_string())
}

async fn audit(s: &TestServer, admin: &str, query: &str) -> Value {
    let (st, v) = s.get(&format!("/admin/v1/audit{query}"), admin).await;
    assert_eq!(st.as_u16(), 200, "{query}: {v}");
    v
}

fn actions(page: &Value) -> Vec<String> {
    page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect()
}

/// Polls until `query` finds records whose `count`s add up to at least `want` (bounded).
async fn counted(s: &TestServer, admin: &str, query: &str, want: u64) -> Vec<Value> {
    for _ in 0..50 {
        let page = audit(s, admin, query).await;
        let records = page["records"].as_array().unwrap().clone();
        let total: u64 = records
            .iter()
            .map(|r| r["details"]["count"].as_u64().unwrap())
            .sum();
        if total >= want {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{query}: fewer than {want} counted");
}

async fn admin_actions_are_recorded(b: Backend) {
    let s = TestServer::start_with(b, quick_audit()).await;
    let (admin, admin_id) = admin_key(&s, KeySpec::default()).await;
    let (st, v) = s
        .post(
            "/admin/v1/tenants",
            &admin,
            json!({"name": "acme", "limits": {"requests_per_minute": 100}}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{v}");
    let acme_id = v["tenant"]["id"].as_str().unwrap().to_string();
    let first_key = v["key"]["id"].as_str().unwrap().to_string();
    let (st, v) = s
        .patch(
            "/admin/v1/tenants/acme",
            &admin,
            json!({"name": "acme2", "budgets": {"tokens_per_day": 5000}, "limits": {"requests_per_minute": 100}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    // A change that changes nothing is not recorded; neither is a second disable.
    let (st, _) = s
        .patch(
            "/admin/v1/tenants/acme2",
            &admin,
            json!({"limits": {"requests_per_minute": 100}}),
        )
        .await;
    assert_eq!(st.as_u16(), 200);
    for _ in 0..2 {
        let (st, _) = s
            .post("/admin/v1/tenants/acme2/disable", &admin, json!({}))
            .await;
        assert_eq!(st.as_u16(), 200);
    }
    let (st, _) = s
        .post("/admin/v1/tenants/acme2/enable", &admin, json!({}))
        .await;
    assert_eq!(st.as_u16(), 200);
    let (st, v) = s
        .post(
            "/admin/v1/tenants/acme2/keys",
            &admin,
            json!({"name": "ci", "expires_at": "2099-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{v}");
    let ci_key = v["key"]["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let (st, _) = s
            .delete(&format!("/admin/v1/tenants/acme2/keys/{ci_key}"), &admin)
            .await;
        assert_eq!(st.as_u16(), 200);
    }
    // The command line's service records its OS user as the actor.
    let cli = confab::admin::Admin::offline(s.store.clone());
    cli.create_tenant("other", Default::default())
        .await
        .unwrap();
    let (st, _) = s.delete("/admin/v1/tenants/acme2", &admin).await;
    assert_eq!(st.as_u16(), 204);

    let page = audit(&s, &admin, "").await;
    assert_eq!(
        actions(&page),
        [
            "tenant.delete",
            "tenant.create",
            "key.revoke",
            "key.create",
            "tenant.enable",
            "tenant.disable",
            "tenant.update",
            "tenant.create",
        ],
        "{page}"
    );
    assert_eq!(page["total"], 8);
    let records = page["records"].as_array().unwrap();
    let by_api: Vec<&Value> = records
        .iter()
        .filter(|r| r["tenant_id"] == acme_id.as_str())
        .collect();
    assert_eq!(by_api.len(), 7);
    for r in &by_api {
        assert_eq!(
            r["actor"],
            json!({"kind": "admin_key", "id": admin_id}),
            "{r}"
        );
    }
    let created = records[7].clone();
    assert_eq!(created["tenant_name"], "acme");
    assert_eq!(created["details"]["first_key"]["id"], first_key.as_str());
    assert_eq!(
        created["details"]["settings"]["limits.requests_per_minute"],
        json!({"from": null, "to": 100})
    );
    let update = &records[6];
    assert_eq!(update["tenant_name"], "acme2");
    assert_eq!(
        update["details"]["changes"],
        json!({
            "name": {"from": "acme", "to": "acme2"},
            "budgets.tokens_per_day": {"from": null, "to": 5000},
        })
    );
    let key_create = &records[3];
    assert_eq!(key_create["target"], ci_key.as_str());
    assert_eq!(key_create["details"]["name"], "ci");
    assert!(key_create["details"]["prefix"]
        .as_str()
        .unwrap()
        .starts_with("cfk_"));
    let other = &records[1];
    assert_eq!(other["tenant_name"], "other");
    assert_eq!(other["actor"]["kind"], "cli");

    // Filters: a tenant by id or (deleted) by its last name; an action or a family; time.
    let by_id = audit(&s, &admin, &format!("?tenant={acme_id}")).await;
    assert_eq!(by_id["total"], 7);
    let by_name = audit(&s, &admin, "?tenant=acme2").await;
    assert_eq!(
        by_name["total"], 6,
        "records written under the new name: {by_name}"
    );
    let keys = audit(&s, &admin, "?action=key").await;
    assert_eq!(actions(&keys), ["key.revoke", "key.create"]);
    let disable = audit(&s, &admin, "?action=tenant.disable").await;
    assert_eq!(disable["total"], 1);
    // (Records may share a millisecond: count what the filter must find.)
    let at = records[4]["at"].as_str().unwrap();
    let at_or_after = records
        .iter()
        .filter(|r| r["at"].as_str().unwrap() >= at)
        .count();
    assert!(at_or_after >= 5);
    let since = audit(&s, &admin, &format!("?since={at}")).await;
    assert_eq!(since["total"], at_or_after, "{since}");
    let until = audit(&s, &admin, &format!("?until={at}")).await;
    assert_eq!(until["total"], 8 - at_or_after);
    let paged = audit(&s, &admin, "?limit=3&offset=3").await;
    assert_eq!(
        actions(&paged),
        ["key.create", "tenant.enable", "tenant.disable"]
    );
    assert_eq!(paged["has_more"], true);
    assert_eq!(audit(&s, &admin, "?tenant=nobody").await["total"], 0);

    // Refusals.
    let (st, v) = s.get("/admin/v1/audit?action=tenants", &admin).await;
    let d = assert_error(st, &v, 400, "validation_error");
    assert!(v["error"]["message"].as_str().is_some(), "{v}");
    assert!(d.to_string().contains("tenant.create"), "{d}");
    for bad in [
        "?since=yesterday",
        "?limit=0",
        "?limit=201",
        "?offset=-1",
        "?tenant=%C3%97%C3%B8",
        "?tenant=bad%20name",
    ] {
        let (st, v) = s.get(&format!("/admin/v1/audit{bad}"), &admin).await;
        assert_error(st, &v, 400, "validation_error");
    }
    let t = s.tenant("third").await;
    let (st, v) = s.get("/admin/v1/audit", &t.key).await;
    assert_error(st, &v, 403, "forbidden");
    s.stop().await;
}

async fn failures_and_expiries_are_counted(b: Backend) {
    let s = TestServer::start_with(b, quick_audit()).await;
    let (admin, _) = admin_key(&s, KeySpec::default()).await;
    let t = s.tenant("acme").await;
    let chat = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let chat_id = chat["id"].as_str().unwrap().to_string();
    // A flood of wrong keys on REST and a WebSocket, missing keys on the admin API.
    for _ in 0..30 {
        let (st, _) = s
            .get("/api/v1/chats/user/u", "cfk_wrong_wrong_wrong_wrong")
            .await;
        assert_eq!(st.as_u16(), 401);
    }
    let mut ws = Ws::connect(&s, "cfk_wrong_wrong_wrong_wrong", "u", &chat_id).await;
    ws.refused("invalid_api_key", 4401).await;
    for _ in 0..5 {
        let (st, _) = s
            .call(reqwest::Method::GET, "/admin/v1/tenants", None, None)
            .await;
        assert_eq!(st.as_u16(), 401);
    }
    // A tenant key where an admin key belongs.
    let (st, _) = s.get("/admin/v1/tenants", &t.key).await;
    assert_eq!(st.as_u16(), 403);

    let wrong = counted(&s, &admin, "?action=auth.fail", 37).await;
    let reason = |r: &Value| r["details"]["reason"].as_str().unwrap().to_string();
    let sum = |reason_: &str| -> u64 {
        wrong
            .iter()
            .filter(|r| reason(r) == reason_)
            .map(|r| r["details"]["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("invalid_api_key"), 31, "{wrong:?}");
    assert_eq!(sum("missing_api_key"), 5);
    assert_eq!(sum("forbidden"), 1);
    // Counted, not written one by one: a row per reason and window.
    assert!(wrong.len() < 20, "{wrong:?}");
    for r in &wrong {
        assert_eq!(
            r["actor"],
            json!({"kind": "client", "id": "127.0.0.1"}),
            "{r}"
        );
        assert!(
            r["details"]["first_at"].as_str().unwrap() <= r["details"]["last_at"].as_str().unwrap()
        );
    }
    let vias: Vec<&Value> = wrong
        .iter()
        .filter(|r| reason(r) == "invalid_api_key")
        .flat_map(|r| r["details"]["via"].as_array().unwrap())
        .collect();
    assert!(vias.contains(&&json!("websocket")) && vias.contains(&&json!("rest")));

    // A key's expiry is recorded once, by the sweep, at the time it expired.
    let (st, v) = s
        .post(
            "/admin/v1/tenants/acme/keys",
            &admin,
            json!({"name": "brief", "expires_at": (Utc::now() + chrono::Duration::milliseconds(600)).to_rfc3339()}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{v}");
    let brief = v["key"]["id"].as_str().unwrap().to_string();
    let brief_secret = v["api_key"].as_str().unwrap().to_string();
    for _ in 0..50 {
        if audit(&s, &admin, "?action=key.expire").await["total"] != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Later sweeps do not record it again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let page = audit(&s, &admin, "?action=key.expire").await;
    assert_eq!(page["total"], 1, "{page}");
    let r = &page["records"][0];
    assert_eq!(r["target"], brief.as_str());
    assert_eq!(r["tenant_name"], "acme");
    assert_eq!(r["actor"]["kind"], "server");
    assert_eq!(r["at"], v["key"]["expires_at"], "{r}");
    let (st, v) = s.get("/api/v1/chats/user/u", &brief_secret).await;
    assert_error(st, &v, 401, "api_key_expired");
    let fails = counted(&s, &admin, "?action=auth", 38).await;
    assert!(fails
        .iter()
        .any(|r| r["details"]["reason"] == "api_key_expired"));
    s.stop().await;
}

async fn old_records_are_pruned(b: Backend) {
    let mut settings = quick_audit();
    settings.audit.retention = Some(chrono::Duration::days(30));
    let s = TestServer::start_with(b, settings).await;
    let (admin, _) = admin_key(&s, KeySpec::default()).await;
    let old = AuditRecord::new(AuditAction::TenantCreate, Actor::Server)
        .at(Utc::now() - chrono::Duration::days(31));
    let recent = AuditRecord::new(AuditAction::TenantDelete, Actor::Server)
        .at(Utc::now() - chrono::Duration::days(29));
    s.store.append_audit(vec![old, recent]).await.unwrap();
    let mut left = Vec::new();
    for _ in 0..50 {
        left = actions(&audit(&s, &admin, "").await);
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, ["tenant.delete"]);
    s.stop().await;
}

crate::backend_tests!(
    admin_actions_are_recorded,
    failures_and_expiries_are_counted,
    old_records_are_pruned,
);
