//! Messages as a tree: regenerate and edit over the WebSocket add siblings, `PUT …/active`
//! switches branch, listings page the active branch (or `branch=all`), replies are built
//! from the active branch only, and existing chats migrate to one branch. SQLite and
//! PostgreSQL, the tiny generated model.

use std::collections::HashMap;

use confab::chat::ChatSettings;
use confab::domain::{BranchView, MessageStatus, NewMessage, Order, PageRequest, Parent, Role};
use migration::{Migrator, MigratorTrait};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{assert_error, Backend, TestServer};
use crate::ws::{tiny_model, Ws};

async fn server(b: Backend) -> TestServer {
    TestServer::start_full(
        b,
        confab::ServerSettings {
            chat: ChatSettings::default(),
            ..Default::default()
        },
        tiny_model(None),
    )
    .await
}

/// Reads one whole reply: (started, ended).
async fn reply(ws: &mut Ws) -> (Value, Value) {
    let started = ws.until("message_stream_started").await;
    let ended = ws.until("message_stream_ended").await;
    assert_eq!(ended["message_id"], started["message_id"], "{ended}");
    (started, ended)
}

fn id(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
        .to_string()
}

/// Owned ids, to compare with listings.
fn owned(ids: &[&String]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// The ids of a listing's messages.
fn ids(v: &Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|m| id(m, "id"))
        .collect()
}

async fn listing(s: &TestServer, key: &str, chat: &str, query: &str) -> Value {
    let (st, v) = s
        .get(&format!("/api/v1/chats/{chat}/messages{query}"), key)
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    v
}

async fn active_branch(s: &TestServer, key: &str, chat: &str) -> Vec<String> {
    let v = listing(s, key, chat, "?limit=200").await;
    let got = ids(&v);
    assert_eq!(v["total"], got.len(), "{v}");
    // The chat's count and active leaf agree with the listing.
    let (_, c) = s.get(&format!("/api/v1/chats/{chat}"), key).await;
    assert_eq!(c["message_count"], got.len(), "{c}");
    assert_eq!(
        c["active_message_id"].as_str(),
        got.last().map(String::as_str),
        "{c}"
    );
    got
}

/// Sends a turn and reads it to its end: (new user message id if one was saved, reply id,
/// the id the reply answers, ended event).
async fn turn(ws: &mut Ws, frame: Value) -> (Option<String>, String, String, Value) {
    let saves = frame["type"] != "regenerate";
    ws.send(frame).await;
    let user = if saves {
        let received = ws.until("message_received").await;
        Some(id(&received, "message_id"))
    } else {
        None
    };
    let (started, ended) = reply(ws).await;
    (
        user,
        id(&started, "message_id"),
        id(&started, "reply_to"),
        ended,
    )
}

async fn regenerate_edit_and_switch_keep_every_branch(b: Backend) {
    let s = server(b).await;
    let t = s.tenant("acme").await;
    let c = s
        .create_chat(
            &t.key,
            json!({"user_id": "u", "config": {"temperature": 0, "max_tokens": 3}}),
        )
        .await;
    let chat = id(&c, "id");
    assert_eq!(c["active_message_id"], Value::Null);
    let mut ws = Ws::connect(&s, &t.key, "u", &chat).await;
    ws.until("connection_established").await;

    // Regenerating in an empty chat is refused, with the field named.
    ws.send(json!({"type": "regenerate"})).await;
    let e = ws.until("error").await;
    assert_eq!(e["code"], "validation_error", "{e}");
    assert_eq!(e["details"]["field"], "message_id", "{e}");

    let (u1, a1, to, _) = turn(&mut ws, json!({"content": "first question"})).await;
    let u1 = u1.unwrap();
    assert_eq!(to, u1);
    let (u2, a2, _, _) = turn(&mut ws, json!({"content": "second question"})).await;
    let u2 = u2.unwrap();
    assert_eq!(
        active_branch(&s, &t.key, &chat).await,
        owned(&[&u1, &a1, &u2, &a2])
    );

    // Regenerate the last reply: a sibling of it, answering the same user message.
    let (none, a2b, to, ended) = turn(&mut ws, json!({"type": "regenerate"})).await;
    assert!(none.is_none());
    assert_eq!(to, u2, "{ended}");
    assert_ne!(a2b, a2);
    assert_eq!(ended["finish_reason"], "length");
    assert_eq!(
        active_branch(&s, &t.key, &chat).await,
        owned(&[&u1, &a1, &u2, &a2b])
    );

    // The listing names each message's alternatives (itself included, oldest first).
    let v = listing(&s, &t.key, &chat, "?limit=200").await;
    assert_eq!(v["messages"][3]["siblings"], json!([a2, a2b]), "{v}");
    assert_eq!(v["messages"][0]["siblings"], json!([u1]));
    assert_eq!(v["messages"][2]["siblings"], json!([u2]));
    let all = listing(&s, &t.key, &chat, "?branch=all").await;
    assert!(all["messages"][0].get("siblings").is_none(), "{all}");

    // Regenerate an earlier reply by id: the branch now ends there.
    let (_, a1b, to, _) = turn(&mut ws, json!({"type": "regenerate", "message_id": a1})).await;
    assert_eq!(to, u1);
    assert_eq!(active_branch(&s, &t.key, &chat).await, owned(&[&u1, &a1b]));

    // Edit the second question: a sibling of it (same parent, a1), then its reply.
    ws.send(json!({"type": "edit", "message_id": u2, "content": "second, edited"}))
        .await;
    let received = ws.until("message_received").await;
    assert_eq!(received["parent_id"], a1.as_str(), "{received}");
    let u2b = id(&received, "message_id");
    let (started, _) = reply(&mut ws).await;
    assert_eq!(started["reply_to"], u2b.as_str());
    let a2c = id(&started, "message_id");
    assert_eq!(
        active_branch(&s, &t.key, &chat).await,
        owned(&[&u1, &a1, &u2b, &a2c])
    );
    let v = listing(&s, &t.key, &chat, "?limit=200").await;
    assert_eq!(v["messages"][2]["content"], "second, edited");
    assert_eq!(v["messages"][2]["parent_id"], a1.as_str());

    // Edit the first question: a new root.
    let (u1b, a1c, _, _) = turn(
        &mut ws,
        json!({"type": "edit", "message_id": u1, "content": "first, edited", "metadata": {"v": 2}}),
    )
    .await;
    let u1b = u1b.unwrap();
    assert_eq!(active_branch(&s, &t.key, &chat).await, owned(&[&u1b, &a1c]));
    let v = listing(&s, &t.key, &chat, "").await;
    assert_eq!(v["messages"][0]["parent_id"], Value::Null);
    assert_eq!(v["messages"][0]["metadata"], json!({"v": 2}));
    assert_eq!(v["messages"][0]["siblings"], json!([u1, u1b]));

    // Everything is kept: every message, in order of writing, with its parent.
    let all = listing(&s, &t.key, &chat, "?branch=all&limit=200").await;
    assert_eq!(all["total"], 10, "{all}");
    assert_eq!(
        ids(&all),
        owned(&[&u1, &a1, &u2, &a2, &a2b, &a1b, &u2b, &a2c, &u1b, &a1c])
    );
    let parents: HashMap<String, Value> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (id(m, "id"), m["parent_id"].clone()))
        .collect();
    assert_eq!(parents[&u1], Value::Null);
    assert_eq!(parents[&a2], json!(u2));
    assert_eq!(parents[&a2b], json!(u2));
    assert_eq!(parents[&a1b], json!(u1));
    assert_eq!(parents[&u2b], json!(a1));
    assert_eq!(parents[&u1b], Value::Null);
    let seqs: Vec<i64> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());

    // Switch to the branch through u2: its newest leaf (the regenerated reply) is active.
    let (st, v) = s
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/chats/{chat}/active"),
            Some(&t.key),
            Some(json!({"message_id": u2})),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(v["active_message_id"], a2b.as_str());
    assert_eq!(v["message_count"], 4);
    assert_eq!(
        active_branch(&s, &t.key, &chat).await,
        owned(&[&u1, &a1, &u2, &a2b])
    );
    // … or exactly to an older leaf.
    let (st, v) = s
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/chats/{chat}/active"),
            Some(&t.key),
            Some(json!({"message_id": a2})),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(
        active_branch(&s, &t.key, &chat).await,
        owned(&[&u1, &a1, &u2, &a2])
    );

    // The next message continues the active branch, and its prompt holds that branch
    // only: the same question costs more prompt on the long branch than on the short one.
    let (u3, _, _, long) = turn(&mut ws, json!({"content": "third"})).await;
    let u3 = u3.unwrap();
    let v = listing(&s, &t.key, &chat, "?order=desc&limit=3").await;
    assert_eq!(v["messages"][1]["id"], u3.as_str());
    assert_eq!(v["messages"][2]["id"], a2.as_str());
    let history = s
        .store
        .tenant(t.id)
        .branch_history(chat.parse().unwrap(), u3.parse().unwrap(), 100)
        .await
        .unwrap();
    let history: Vec<String> = history.iter().map(|m| m.id.to_string()).collect();
    assert_eq!(history, owned(&[&u1, &a1, &u2, &a2, &u3]));
    s.call(
        reqwest::Method::PUT,
        &format!("/api/v1/chats/{chat}/active"),
        Some(&t.key),
        Some(json!({"message_id": a1c})),
    )
    .await;
    let (_, _, _, short) = turn(&mut ws, json!({"content": "third"})).await;
    let tokens = |e: &Value| e["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens(&long) > tokens(&short), "{long} vs {short}");

    // Refusals: each names what is wrong and saves nothing (a new socket: a fresh burst of
    // its message rate).
    ws.close().await;
    let mut ws = Ws::connect(&s, &t.key, "u", &chat).await;
    ws.until("connection_established").await;
    let before = listing(&s, &t.key, &chat, "?branch=all").await["total"].clone();
    let cases = [
        (
            json!({"type": "edit", "message_id": a1, "content": "x"}),
            "validation_error",
        ),
        (
            json!({"type": "regenerate", "message_id": u1}),
            "validation_error",
        ),
        (
            json!({"type": "edit", "message_id": Uuid::new_v4(), "content": "x"}),
            "message_not_found",
        ),
        (
            json!({"type": "regenerate", "message_id": Uuid::new_v4()}),
            "message_not_found",
        ),
        (
            json!({"type": "edit", "message_id": "nope", "content": "x"}),
            "validation_error",
        ),
        (json!({"type": "edit", "content": "x"}), "validation_error"),
        (
            json!({"type": "edit", "message_id": u1, "content": " "}),
            "validation_error",
        ),
        (
            json!({"type": "regenerate", "message_id": 7}),
            "validation_error",
        ),
    ];
    for (frame, code) in cases {
        ws.send(frame.clone()).await;
        let e = ws.until("error").await;
        assert_eq!(e["code"], code, "{frame}: {e}");
        assert!(e["details"].is_object(), "{e}");
        if code == "validation_error" {
            assert!(e["details"]["field"].as_str().is_some(), "{e}");
        }
    }
    assert_eq!(
        listing(&s, &t.key, &chat, "?branch=all").await["total"],
        before
    );

    // Switching to a message that is not in the chat (another chat's, or none).
    let other = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let other = id(&other, "id");
    // The chat exists and the reference is wrong: 400; no chat: 404.
    for (chat_id, message_id, status, code) in [
        (
            chat.as_str(),
            Uuid::new_v4().to_string(),
            400,
            "message_not_found",
        ),
        (other.as_str(), u1.clone(), 400, "message_not_found"),
        (
            &*Uuid::new_v4().to_string(),
            u1.clone(),
            404,
            "chat_not_found",
        ),
    ] {
        let (st, v) = s
            .call(
                reqwest::Method::PUT,
                &format!("/api/v1/chats/{chat_id}/active"),
                Some(&t.key),
                Some(json!({"message_id": message_id})),
            )
            .await;
        assert_error(st, &v, status, code);
    }
    // Another tenant cannot switch (or see) this chat.
    let t2 = s.tenant("other").await;
    let (st, v) = s
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/chats/{chat}/active"),
            Some(&t2.key),
            Some(json!({"message_id": u1})),
        )
        .await;
    assert_error(st, &v, 404, "chat_not_found");

    // Deleting the chat takes its whole tree.
    let (st, _) = s.delete(&format!("/api/v1/chats/{chat}"), &t.key).await;
    assert_eq!(st.as_u16(), 204);
    for m in [&u1, &a2, &u1b] {
        assert!(s
            .store
            .tenant(t.id)
            .get_message(chat.parse().unwrap(), m.parse().unwrap())
            .await
            .is_err());
    }
    ws.close().await;
    s.stop().await;
}

/// Adds a message under `parent` through the store (an assistant's when `text` starts
/// with `a`).
async fn add(
    s: &TestServer,
    tenant: confab::store::TenantId,
    chat: Uuid,
    parent: Parent,
    text: &str,
) -> Uuid {
    let role = if text.starts_with('a') {
        Role::Assistant
    } else {
        Role::User
    };
    s.add_message(tenant, &chat.to_string(), parent, role, text, json!({}))
        .await
}

async fn a_branch_pages_like_a_list(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await;
    let c = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let chat: Uuid = id(&c, "id").parse().unwrap();
    // A branch of 7 (u1 a1 … u4) with side branches hanging off it.
    let mut main = Vec::new();
    for i in 0..7 {
        let text = if i % 2 == 0 { "u" } else { "a" };
        main.push(add(&s, t.id, chat, Parent::Active, &format!("{text}{i}")).await);
        if i == 2 {
            // A regenerated-style sibling of message 2 (under message 1), then back.
            add(&s, t.id, chat, Parent::Of(Some(main[1])), "u-side").await;
            add(&s, t.id, chat, Parent::Active, "a-side").await;
            s.store
                .tenant(t.id)
                .set_active_message(chat, main[2])
                .await
                .unwrap();
        }
    }
    let scope = s.store.tenant(t.id);
    let cases: &[(u64, u64, Order, &[usize])] = &[
        (0, 50, Order::Asc, &[0, 1, 2, 3, 4, 5, 6]),
        (0, 3, Order::Asc, &[0, 1, 2]),
        (3, 3, Order::Asc, &[3, 4, 5]),
        (6, 3, Order::Asc, &[6]),
        (7, 3, Order::Asc, &[]),
        (100, 3, Order::Asc, &[]),
        (0, 50, Order::Desc, &[6, 5, 4, 3, 2, 1, 0]),
        (0, 2, Order::Desc, &[6, 5]),
        (5, 2, Order::Desc, &[1, 0]),
        (6, 5, Order::Desc, &[0]),
        (9, 5, Order::Desc, &[]),
    ];
    for (offset, limit, order, want) in cases {
        let page = PageRequest {
            offset: *offset,
            limit: *limit,
            order: *order,
        };
        let p = scope
            .list_messages(chat, page, BranchView::Active)
            .await
            .unwrap();
        let got: Vec<Uuid> = p.items.iter().map(|m| m.id).collect();
        let want: Vec<Uuid> = want.iter().map(|&i| main[i]).collect();
        assert_eq!(got, want, "{offset} {limit} {order:?}");
        assert_eq!(p.total, 7);
        assert!(p.items.iter().all(|m| !m.content.contains("side")));
    }
    let all = scope
        .list_messages(
            chat,
            PageRequest {
                offset: 0,
                limit: 50,
                order: Order::Asc,
            },
            BranchView::All,
        )
        .await
        .unwrap();
    assert_eq!(all.total, 9);
    // The recent history of the active branch, oldest first, bounded.
    let recent = scope.recent_messages(chat, 3).await.unwrap();
    assert_eq!(
        recent.iter().map(|m| m.id).collect::<Vec<_>>(),
        main[4..].to_vec()
    );
    // Depths follow the branch.
    assert_eq!(
        recent.iter().map(|m| m.depth).collect::<Vec<_>>(),
        [5, 6, 7]
    );
    // A parent that is not in this chat is refused, and nothing is added.
    let other = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let other: Uuid = id(&other, "id").parse().unwrap();
    let e = scope
        .append_message(
            other,
            NewMessage {
                role: Role::User,
                content: "x".into(),
                metadata: Default::default(),
                status: MessageStatus::Complete,
                parent: Parent::Of(Some(main[0])),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, confab::store::StoreError::MessageNotFound(m) if m == main[0]),
        "{e:?}"
    );
    assert_eq!(scope.get_chat(other).await.unwrap().message_count, 0);
    s.stop().await;
}

/// Chats written before messages had parents become one branch each, and the search index
/// takes in what is stored: the migrations' `down` and `up` run over stored chats (as an
/// upgrade from the previous release does).
async fn existing_chats_migrate_to_one_branch(b: Backend) {
    let s = TestServer::start(b).await;
    let t = s.tenant("acme").await.id;
    let (store, url) = (s.store.clone(), s.db_url.clone());
    let scope = store.tenant(t);
    let mut chats = Vec::new();
    for n in [5usize, 0, 2] {
        let (c, _) = scope
            .create_chat(confab::domain::NewChat {
                user_id: "u".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let text = if i % 2 == 0 { "u" } else { "a" };
            ids.push(add(&s, t, c.id, Parent::Active, &format!("{text}{i}")).await);
        }
        chats.push((c.id, ids));
    }
    let db = sea_orm::Database::connect(&url).await.expect("connect");
    // Down past the tree (and the search index after it), then up again.
    Migrator::down(&db, Some(2)).await.expect("down");
    Migrator::up(&db, None).await.expect("up again");
    for (chat, ids) in &chats {
        let c = scope.get_chat(*chat).await.unwrap();
        assert_eq!(c.message_count, ids.len() as i64);
        assert_eq!(c.active_message_id, ids.last().copied());
        let page = scope
            .list_messages(
                *chat,
                PageRequest {
                    offset: 0,
                    limit: 50,
                    order: Order::Asc,
                },
                BranchView::Active,
            )
            .await
            .unwrap();
        assert_eq!(page.items.iter().map(|m| m.id).collect::<Vec<_>>(), *ids);
        for (i, m) in page.items.iter().enumerate() {
            assert_eq!(m.depth, i as i64 + 1);
            assert_eq!(m.parent_id, i.checked_sub(1).map(|p| ids[p]));
        }
    }
    // The search index holds what was stored before it existed.
    let hits = scope
        .search_chats(
            "u",
            &confab::store::SearchQuery::parse("a1").unwrap(),
            PageRequest {
                offset: 0,
                limit: 50,
                order: Order::Desc,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        hits.items.iter().map(|m| m.chat.id).collect::<Vec<_>>(),
        [chats[2].0, chats[0].0]
    );
    // New messages go on after the migrated ones.
    let (chat, ids) = &chats[0];
    let next = add(&s, t, *chat, Parent::Active, "u-next").await;
    let m = scope.get_message(*chat, next).await.unwrap();
    assert_eq!((m.seq, m.depth, m.parent_id), (6, 6, ids.last().copied()));
    db.close().await.ok();
    s.stop().await;
}

backend_tests!(
    regenerate_edit_and_switch_keep_every_branch,
    a_branch_pages_like_a_list,
    existing_chats_migrate_to_one_branch,
);
