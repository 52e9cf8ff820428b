//! Message pagination: `total`, `has_more`, both orders, limits at and past the bounds.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{assert_error, Backend, TestServer};

fn seqs(v: &Value) -> Vec<i64> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect()
}

async fn pagination(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let c = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let id = c["id"].as_str().unwrap();
    let path = format!("/api/v1/chats/{id}/messages");

    // Empty chat.
    let (st, v) = s.get(&path, &t.key).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"messages": [], "total": 0, "offset": 0, "limit": 50, "has_more": false})
    );

    s.add_messages(t.id, id, 7).await;

    let (_, v) = s.get(&path, &t.key).await;
    assert_eq!(seqs(&v), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(
        (
            v["total"].as_u64(),
            v["offset"].as_u64(),
            v["limit"].as_u64()
        ),
        (Some(7), Some(0), Some(50))
    );
    assert_eq!(v["has_more"], false);
    let m = &v["messages"][0];
    assert_eq!(m["role"], "user");
    assert_eq!(m["content"], "message 1");
    assert_eq!(m["status"], "complete");
    assert_eq!(m["chat_id"], id);
    assert_eq!(m["metadata"], json!({}));
    assert_eq!(m["usage"], Value::Null);
    assert_eq!(v["messages"][1]["role"], "assistant");

    // Table of (query, expected seqs, has_more).
    let cases: &[(&str, &[i64], bool)] = &[
        ("?limit=3", &[1, 2, 3], true),
        ("?offset=3&limit=3", &[4, 5, 6], true),
        ("?offset=6&limit=3", &[7], false),
        ("?offset=4&limit=3", &[5, 6, 7], false),
        ("?offset=7&limit=3", &[], false),
        ("?offset=100", &[], false),
        ("?order=desc", &[7, 6, 5, 4, 3, 2, 1], false),
        ("?order=desc&limit=2", &[7, 6], true),
        ("?order=desc&offset=5&limit=2", &[2, 1], false),
        ("?order=asc&offset=5&limit=1", &[6], true),
        ("?limit=1", &[1], true),
        ("?limit=200", &[1, 2, 3, 4, 5, 6, 7], false),
    ];
    for (q, want, more) in cases {
        let (st, v) = s.get(&format!("{path}{q}"), &t.key).await;
        assert_eq!(st, StatusCode::OK, "{q}: {v}");
        assert_eq!(seqs(&v), *want, "{q}");
        assert_eq!(v["has_more"], *more, "{q}");
        assert_eq!(v["total"], 7, "{q}");
    }

    // Past the bounds: named parameter, 400.
    for (q, param) in [
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=ten", "limit"),
        ("?offset=-1", "offset"),
        ("?offset=99999999999", "offset"),
        ("?order=sideways", "order"),
    ] {
        let (st, v) = s.get(&format!("{path}{q}"), &t.key).await;
        let d = assert_error(st, &v, 400, "validation_error");
        assert_eq!(d["parameter"], param, "{q}: {v}");
    }
    s.stop().await;
}

async fn sequence_is_stable_under_concurrency(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let c = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = s.store.clone();
        let chat: uuid::Uuid = id.parse().unwrap();
        let tenant = t.id;
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                store
                    .tenant(tenant)
                    .append_message(
                        chat,
                        confab::domain::NewMessage {
                            role: confab::domain::Role::User,
                            content: format!("m{i}"),
                            metadata: Default::default(),
                            status: confab::domain::MessageStatus::Complete,
                            parent: confab::domain::Parent::Active,
                        },
                    )
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (_, v) = s
        .get(&format!("/api/v1/chats/{id}/messages?limit=200"), &t.key)
        .await;
    assert_eq!(seqs(&v), (1..=20).collect::<Vec<_>>());
    let (_, chat) = s.get(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_eq!(chat["message_count"], 20);
    s.stop().await;
}

crate::backend_tests!(pagination, sequence_is_stable_under_concurrency);
