//! Export and import of whole chats: JSON (the whole tree) round-trips through
//! `POST /api/v1/chats/import` unchanged, Markdown holds the active branch, OpenAI-style
//! lists become one branch, and bad imports are refused whole.

use std::collections::HashMap;

use confab::domain::{Limits, Parent, Role};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{assert_error, Backend, TestServer};

async fn add(
    s: &TestServer,
    tenant: confab::store::TenantId,
    chat: &str,
    parent: Parent,
    role: Role,
    text: &str,
) -> Uuid {
    s.add_message(tenant, chat, parent, role, text, json!({"n": text.len()}))
        .await
}

/// An export with ids replaced by positions and volatile fields dropped: what an import
/// must keep.
fn shape(export: &Value) -> Value {
    let msgs = export["messages"].as_array().unwrap();
    let pos: HashMap<&str, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m["id"].as_str().unwrap(), i))
        .collect();
    let at = |v: &Value| v.as_str().map(|id| pos[id]);
    json!({
        "title": export["title"],
        "metadata": export["metadata"],
        "config": export["config"],
        "active": at(&export["active_message_id"]),
        "messages": msgs.iter().map(|m| json!({
            "parent": at(&m["parent_id"]),
            "role": m["role"],
            "content": m["content"],
            "metadata": m["metadata"],
            "status": m["status"],
            "created_at": m["created_at"],
        })).collect::<Vec<_>>(),
    })
}

async fn raw_get(s: &TestServer, path: &str, key: &str) -> (u16, String, String, String) {
    let r = s
        .http
        .get(format!("{}{path}", s.base))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let header = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (ct, cd) = (header("content-type"), header("content-disposition"));
    (status, ct, cd, r.text().await.unwrap())
}

async fn export_import_round_trip(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let c = s
        .create_chat(
            &t.key,
            json!({"user_id": "alice", "title": "Trip: Paris & Rome!", "metadata": {"tag": "travel"},
                   "config": {"system_prompt": "Be brief.", "temperature": 0.5, "stop": ["END"]}}),
        )
        .await;
    let chat = c["id"].as_str().unwrap().to_string();
    let u1 = add(&s, t.id, &chat, Parent::Active, Role::User, "Where first?").await;
    let a1 = add(
        &s,
        t.id,
        &chat,
        Parent::Active,
        Role::Assistant,
        "Paris, then Rome.",
    )
    .await;
    // A regenerated reply beside a1, continued; then the first branch made active again.
    add(
        &s,
        t.id,
        &chat,
        Parent::Of(Some(u1)),
        Role::Assistant,
        "Rome first.",
    )
    .await;
    add(&s, t.id, &chat, Parent::Active, Role::User, "Why Rome?").await;
    let a1_follow = add(
        &s,
        t.id,
        &chat,
        Parent::Of(Some(a1)),
        Role::User,
        "How long in Paris?",
    )
    .await;
    add(
        &s,
        t.id,
        &chat,
        Parent::Of(Some(a1_follow)),
        Role::Assistant,
        "Three days.\n\n- Louvre\n- Orsay",
    )
    .await;

    let (st, v) = s.get(&format!("/api/v1/chats/{chat}/export"), &t.key).await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(
        (v["format"].as_str(), v["version"].as_u64()),
        (Some("confab.chat"), Some(1))
    );
    assert_eq!(v["chat_id"], chat.as_str());
    assert_eq!(v["user_id"], "alice");
    assert_eq!(v["messages"].as_array().unwrap().len(), 6);
    assert_eq!(v["messages"][2]["parent_id"], u1.to_string());
    let original = shape(&v);
    assert_eq!(original["active"], 5);

    // Imported for another user: a new chat, the same tree, messages, settings and times.
    let mut body = v.clone();
    body["user_id"] = json!("bob");
    let (st, imported) = s.post("/api/v1/chats/import", &t.key, body).await;
    assert_eq!(st.as_u16(), 201, "{imported}");
    let new_chat = imported["id"].as_str().unwrap().to_string();
    assert_ne!(new_chat, chat);
    assert_eq!(imported["user_id"], "bob");
    assert_eq!(imported["message_count"], 4);
    let (_, again) = s
        .get(&format!("/api/v1/chats/{new_chat}/export"), &t.key)
        .await;
    assert_eq!(shape(&again), original);
    let old_ids: Vec<&Value> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["id"])
        .collect();
    assert!(again["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| !old_ids.contains(&&m["id"])));
    // It is a chat like any other: its branch pages, its words are found.
    let (_, page) = s
        .get(&format!("/api/v1/chats/{new_chat}/messages"), &t.key)
        .await;
    assert_eq!(page["total"], 4);
    assert_eq!(
        page["messages"][3]["content"],
        "Three days.\n\n- Louvre\n- Orsay"
    );
    let (_, found) = s.get("/api/v1/chats/user/bob?q=louvre", &t.key).await;
    assert_eq!(found["total"], 1, "{found}");

    // Markdown: the active branch only, as a download.
    let (st, ct, cd, md) = raw_get(
        &s,
        &format!("/api/v1/chats/{chat}/export?format=markdown"),
        &t.key,
    )
    .await;
    assert_eq!(st, 200, "{md}");
    assert_eq!(ct, "text/markdown; charset=utf-8");
    assert_eq!(cd, "attachment; filename=\"Trip-Paris-Rome.md\"");
    assert_eq!(
        md,
        "# Trip: Paris & Rome!\n\n## System\n\nBe brief.\n\n## User\n\nWhere first?\n\n\
         ## Assistant\n\nParis, then Rome.\n\n## User\n\nHow long in Paris?\n\n\
         ## Assistant\n\nThree days.\n\n- Louvre\n- Orsay\n"
    );
    let (_, _, cd, _) = raw_get(&s, &format!("/api/v1/chats/{chat}/export"), &t.key).await;
    assert_eq!(cd, "attachment; filename=\"Trip-Paris-Rome.json\"");

    // Another tenant's chat does not exist for export.
    let t2 = s.tenant("other").await;
    let (st, v) = s
        .get(&format!("/api/v1/chats/{chat}/export"), &t2.key)
        .await;
    assert_error(st, &v, 404, "chat_not_found");
    let (st, v) = s
        .get(&format!("/api/v1/chats/{}/export", Uuid::new_v4()), &t.key)
        .await;
    assert_error(st, &v, 404, "chat_not_found");
    let (st, v) = s
        .get(&format!("/api/v1/chats/{chat}/export?format=pdf"), &t.key)
        .await;
    assert_error(st, &v, 400, "validation_error");
    s.stop().await;
}

async fn openai_lists_import_as_one_branch_and_bad_imports_create_nothing(b: Backend) {
    let s = TestServer::start_with(
        b,
        confab::ServerSettings {
            limits: Limits {
                max_import_messages: 4,
                max_import_bytes: 4096,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let t = s.tenant("acme").await;
    let (st, c) = s
        .post(
            "/api/v1/chats/import",
            &t.key,
            json!({"user_id": "u", "title": "From elsewhere", "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
            ]}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{c}");
    assert_eq!(c["message_count"], 3);
    assert_eq!(c["title"], "From elsewhere");
    let (_, page) = s
        .get(
            &format!("/api/v1/chats/{}/messages", c["id"].as_str().unwrap()),
            &t.key,
        )
        .await;
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Hi", "Hello!", "Bye"]);
    assert_eq!(page["messages"][1]["parent_id"], page["messages"][0]["id"]);
    assert_eq!(page["messages"][2]["status"], "complete");
    // An empty chat can be imported too.
    let (st, c) = s
        .post(
            "/api/v1/chats/import",
            &t.key,
            json!({"user_id": "u", "messages": []}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{c}");
    assert_eq!(
        (c["message_count"].as_i64(), &c["active_message_id"]),
        (Some(0), &Value::Null)
    );

    let mut deep = json!(1);
    for _ in 0..12 {
        deep = json!({ "a": deep });
    }
    let m = |id: &str, parent: Value| json!({"id": id, "parent_id": parent, "role": "user", "content": "x"});
    let cases = [
        (
            json!({"user_id": "u", "messages": [m("a", Value::Null), m("b", json!("zz"))]}),
            400,
            "messages[1].parent_id",
        ),
        (
            json!({"user_id": "u", "messages": [m("a", Value::Null), {"role": "user", "content": "x"}]}),
            400,
            "messages[1].id",
        ),
        (
            json!({"user_id": "u", "messages": [m("a", Value::Null), m("a", Value::Null)]}),
            400,
            "messages[1].id",
        ),
        (
            json!({"user_id": "u", "active_message_id": "q", "messages": [m("a", Value::Null)]}),
            400,
            "active_message_id",
        ),
        (
            json!({"user_id": "u", "format": "other", "messages": []}),
            400,
            "format",
        ),
        (
            json!({"user_id": "u", "version": 2, "messages": []}),
            400,
            "version",
        ),
        (
            json!({"user_id": "u", "messages": [{"role": "user", "content": "x", "metadata": deep}]}),
            400,
            "messages[0].metadata",
        ),
        (
            json!({"user_id": "u", "messages": (0..5).map(|_| json!({"role": "user", "content": "x"})).collect::<Vec<_>>()}),
            400,
            "messages",
        ),
        (
            json!({"user_id": "u", "messages": [{"role": "tool", "content": "x"}]}),
            400,
            "",
        ),
        (json!({"user_id": "bad user", "messages": []}), 400, ""),
        (
            json!({"user_id": "u", "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
            413,
            "",
        ),
    ];
    for (body, status, field) in cases {
        let (st, v) = s.post("/api/v1/chats/import", &t.key, body.clone()).await;
        let code = if status == 413 {
            "payload_too_large"
        } else {
            "validation_error"
        };
        let d = assert_error(st, &v, status, code);
        if !field.is_empty() {
            assert_eq!(d["field"], field, "{body}: {v}");
        }
    }
    // Nothing was created by the refused imports.
    let (_, list) = s.get("/api/v1/chats/user/u", &t.key).await;
    assert_eq!(list["total"], 2, "{list}");
    s.stop().await;
}

backend_tests!(
    export_import_round_trip,
    openai_lists_import_as_one_branch_and_bad_imports_create_nothing,
);
