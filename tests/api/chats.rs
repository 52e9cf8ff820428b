//! Creating, reading, listing, changing and deleting chats.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{assert_error, Backend, TestServer};

async fn health_needs_no_key(b: Backend) {
    let s = TestServer::start(b).await;
    let (st, v) = s.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    let (st, v) = s.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["database"], "ok");
    s.stop().await;
}

async fn create_and_get(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let body = json!({
        "user_id": "user123",
        "title": "Billing question",
        "metadata": {"zeta": 1, "alpha": {"nested": [1, 2, "three"]}, "mid": null},
        "config": {"system_prompt": "Be brief.", "temperature": 0.2, "top_k": 40, "seed": 18446744073709551615u64, "stop": ["\n\nUser:"]}
    });
    let c = s.create_chat(&t.key, body).await;
    assert_eq!(c["user_id"], "user123");
    assert_eq!(c["title"], "Billing question");
    assert_eq!(c["tenant_id"], t.id.to_string());
    assert_eq!(c["message_count"], 0);
    // Key order of metadata is kept as sent.
    let keys: Vec<_> = c["metadata"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["zeta", "alpha", "mid"]);
    assert_eq!(c["metadata"]["alpha"]["nested"][2], "three");
    assert_eq!(
        c["config"],
        json!({"system_prompt": "Be brief.", "temperature": 0.2, "top_k": 40, "seed": 18446744073709551615u64, "stop": ["\n\nUser:"]})
    );
    let ts = c["created_at"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == 24,
        "RFC 3339 UTC with millis: {ts}"
    );
    assert_eq!(c["created_at"], c["updated_at"]);
    assert_eq!(c["created_at"], c["last_activity_at"]);

    let id = c["id"].as_str().unwrap();
    let (st, got) = s.get(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got, c, "read back exactly as created");

    // Without the trailing slash too; only user_id is required.
    let (st, c2) = s
        .post("/api/v1/chats", &t.key, json!({"user_id": "user123"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{c2}");
    assert_eq!(c2["title"], serde_json::Value::Null);
    assert_eq!(c2["metadata"], json!({}));
    assert_eq!(c2["config"], json!({}));

    // Text is stored exactly as sent, untrimmed, any Unicode.
    let title = "  Ünïcødé 漢字 🎉 title  ";
    let c3 = s
        .create_chat(
            &t.key,
            json!({"user_id": "ana@example.com", "title": title}),
        )
        .await;
    assert_eq!(c3["title"], title);

    // message count and last activity follow new messages
    s.add_messages(t.id, id, 3).await;
    let (_, got) = s.get(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_eq!(got["message_count"], 3);
    assert!(got["last_activity_at"].as_str() >= c["last_activity_at"].as_str());
    s.stop().await;
}

async fn list_user_chats(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let c = s
            .create_chat(
                &t.key,
                json!({"user_id": "u1", "title": format!("chat {i}")}),
            )
            .await;
        ids.push(c["id"].as_str().unwrap().to_string());
    }
    s.create_chat(&t.key, json!({"user_id": "u2"})).await;

    let (st, v) = s.get("/api/v1/chats/user/u1", &t.key).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["total"], 5);
    assert_eq!(v["offset"], 0);
    assert_eq!(v["limit"], 50);
    assert_eq!(v["has_more"], false);
    let got: Vec<_> = v["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(got, newest_first);

    let (_, v) = s
        .get("/api/v1/chats/user/u1?offset=1&limit=2", &t.key)
        .await;
    assert_eq!(v["chats"].as_array().unwrap().len(), 2);
    assert_eq!(v["chats"][0]["id"], newest_first[1].as_str());
    assert_eq!(v["has_more"], true);
    let (_, v) = s
        .get("/api/v1/chats/user/u1?offset=3&limit=2", &t.key)
        .await;
    assert_eq!(v["has_more"], false);
    assert_eq!(v["chats"].as_array().unwrap().len(), 2);

    // An unknown user simply has no chats.
    let (st, v) = s.get("/api/v1/chats/user/nobody", &t.key).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["total"], 0);
    assert_eq!(v["chats"], json!([]));

    let (st, v) = s.get("/api/v1/chats/user/u1?limit=201", &t.key).await;
    let d = assert_error(st, &v, 400, "validation_error");
    assert_eq!(d["parameter"], "limit");
    s.stop().await;
}

async fn patch_chat(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let c = s
        .create_chat(&t.key, json!({"user_id": "u", "title": "old", "metadata": {"a": 1}, "config": {"system_prompt": "Be brief.", "temperature": 0.5}}))
        .await;
    let path = format!("/api/v1/chats/{}", c["id"].as_str().unwrap());

    let (st, v) = s.patch(&path, &t.key, json!({"title": "new"})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["title"], "new");
    assert_eq!(v["metadata"], json!({"a": 1}), "untouched");
    assert_eq!(v["config"], c["config"], "untouched");
    assert!(v["updated_at"].as_str() >= c["updated_at"].as_str());

    // config merges field by field; null clears one field
    let (st, v) = s
        .patch(
            &path,
            &t.key,
            json!({"config": {"temperature": null, "top_p": 0.9}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v["config"],
        json!({"system_prompt": "Be brief.", "top_p": 0.9})
    );

    // metadata is replaced whole; title null clears it
    let (st, v) = s
        .patch(
            &path,
            &t.key,
            json!({"metadata": {"b": [true]}, "title": null}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["metadata"], json!({"b": [true]}));
    assert_eq!(v["title"], serde_json::Value::Null);

    // An empty patch changes nothing.
    let (st, v2) = s.patch(&path, &t.key, json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v2, v);

    // Out-of-range settings are refused and nothing changes.
    let (st, e) = s
        .patch(&path, &t.key, json!({"config": {"temperature": 2.5}}))
        .await;
    assert_error(st, &e, 400, "validation_error");
    let (st, e) = s
        .patch(&path, &t.key, json!({"config": {"stop": [""]}}))
        .await;
    let d = assert_error(st, &e, 400, "validation_error");
    assert_eq!(d["field"], "config.stop[0]");
    let (_, after) = s.get(&path, &t.key).await;
    assert_eq!(after, v);

    let (st, e) = s
        .patch(
            "/api/v1/chats/00000000-0000-0000-0000-000000000000",
            &t.key,
            json!({"title": "x"}),
        )
        .await;
    assert_error(st, &e, 404, "chat_not_found");
    s.stop().await;
}

async fn delete_chat(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let keep = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let c = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let id = c["id"].as_str().unwrap();
    s.add_messages(t.id, id, 4).await;
    s.add_messages(t.id, keep["id"].as_str().unwrap(), 2).await;

    let (st, v) = s.delete(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(v, serde_json::Value::Null);
    let (st, v) = s.get(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_error(st, &v, 404, "chat_not_found");
    let (st, v) = s.get(&format!("/api/v1/chats/{id}/messages"), &t.key).await;
    assert_error(st, &v, 404, "chat_not_found");
    let (st, v) = s.delete(&format!("/api/v1/chats/{id}"), &t.key).await;
    assert_error(st, &v, 404, "chat_not_found");

    // The other chat and its messages are untouched.
    let (st, v) = s
        .get(
            &format!("/api/v1/chats/{}/messages", keep["id"].as_str().unwrap()),
            &t.key,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["total"], 2);
    let (_, v) = s.get("/api/v1/chats/user/u", &t.key).await;
    assert_eq!(v["total"], 1);
    s.stop().await;
}

crate::backend_tests!(
    health_needs_no_key,
    create_and_get,
    list_user_chats,
    patch_chat,
    delete_chat
);
