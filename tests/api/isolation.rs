//! Tenant B can neither see, list, read messages of, change nor delete tenant A's chats.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{assert_error, Backend, TestServer};

async fn tenants_are_isolated(b: Backend) {
    let s = TestServer::start(b).await;
    let a = s.tenant("tenant-a").await;
    let bt = s.tenant("tenant-b").await;
    // Same user id in both tenants: two different users.
    let ca = s
        .create_chat(&a.key, json!({"user_id": "shared-user", "title": "A's"}))
        .await;
    let cb = s
        .create_chat(&bt.key, json!({"user_id": "shared-user", "title": "B's"}))
        .await;
    let ida = ca["id"].as_str().unwrap();
    s.add_messages(a.id, ida, 3).await;

    let p = format!("/api/v1/chats/{ida}");
    let (st, v) = s.get(&p, &bt.key).await;
    let d = assert_error(st, &v, 404, "chat_not_found");
    assert_eq!(d["chat_id"], ida);
    // ...exactly like a chat that does not exist:
    let (st2, v2) = s
        .get(
            "/api/v1/chats/00000000-0000-0000-0000-000000000000",
            &bt.key,
        )
        .await;
    assert_eq!(st2, st);
    assert_eq!(v2["error"]["code"], v["error"]["code"]);

    let (st, v) = s.get(&format!("{p}/messages"), &bt.key).await;
    assert_error(st, &v, 404, "chat_not_found");
    let (st, v) = s
        .patch(
            &p,
            &bt.key,
            json!({"title": "hijacked", "metadata": {"x": 1}}),
        )
        .await;
    assert_error(st, &v, 404, "chat_not_found");
    let (st, v) = s.delete(&p, &bt.key).await;
    assert_error(st, &v, 404, "chat_not_found");

    let (_, lb) = s.get("/api/v1/chats/user/shared-user", &bt.key).await;
    assert_eq!(lb["total"], 1);
    assert_eq!(lb["chats"][0]["id"], cb["id"]);
    let (_, la) = s.get("/api/v1/chats/user/shared-user", &a.key).await;
    assert_eq!(la["total"], 1);
    assert_eq!(la["chats"][0]["id"], ca["id"]);

    // A's chat is intact after B's attempts.
    let (st, v) = s.get(&p, &a.key).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["title"], "A's");
    assert_eq!(v["message_count"], 3);
    let (_, m) = s.get(&format!("{p}/messages"), &a.key).await;
    assert_eq!(m["total"], 3);

    // The store refuses cross-tenant access directly too.
    let id: uuid::Uuid = ida.parse().unwrap();
    assert!(matches!(
        s.store.tenant(bt.id).get_chat(id).await,
        Err(confab::store::StoreError::NotFound)
    ));
    assert!(matches!(
        s.store.tenant(bt.id).delete_chat(id).await,
        Err(confab::store::StoreError::NotFound)
    ));
    let append = s
        .store
        .tenant(bt.id)
        .append_message(
            id,
            confab::domain::NewMessage {
                role: confab::domain::Role::User,
                content: "x".into(),
                metadata: Default::default(),
                status: confab::domain::MessageStatus::Complete,
            },
        )
        .await;
    assert!(matches!(append, Err(confab::store::StoreError::NotFound)));
    let (_, m) = s.get(&format!("{p}/messages"), &a.key).await;
    assert_eq!(m["total"], 3);
    s.stop().await;
}

crate::backend_tests!(tenants_are_isolated);
