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
                parent: confab::domain::Parent::Active,
            },
        )
        .await;
    assert!(matches!(append, Err(confab::store::StoreError::NotFound)));
    let (_, m) = s.get(&format!("{p}/messages"), &a.key).await;
    assert_eq!(m["total"], 3);
    s.stop().await;
}

crate::backend_tests!(
    tenants_are_isolated,
    random_interleavings_keep_tenants_apart
);

/// What one tenant's worker believes it owns: chat id → (user, title, messages).
type Owned = std::collections::BTreeMap<String, (String, Option<String>, u64)>;

/// One tenant's worker: a seeded random mix of its own creates, lists, reads, renames,
/// deletes and WebSocket messages, plus attempts on other tenants' chats, each checked as it
/// happens. Returns what it owns at the end.
async fn worker(
    s: &TestServer,
    key: &str,
    seed: u64,
    foreign: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> Owned {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let users = ["ann", "bob", "shared"];
    let mut owned = Owned::new();
    for step in 0..60 {
        let pick_own = |rng: &mut rand_chacha::ChaCha8Rng, owned: &Owned| {
            let ids: Vec<&String> = owned.keys().collect();
            (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())].clone())
        };
        match rng.random_range(0..8) {
            0 | 1 => {
                let user = users[rng.random_range(0..users.len())];
                let title = format!("t{seed}-{step}");
                let c = s
                    .create_chat(
                        key,
                        json!({"user_id": user, "title": title, "config": {"temperature": 0, "max_tokens": 3}}),
                    )
                    .await;
                let id = c["id"].as_str().unwrap().to_string();
                foreign.lock().unwrap().push(id.clone());
                owned.insert(id, (user.to_string(), Some(title), 0));
            }
            2 => {
                let user = users[rng.random_range(0..users.len())];
                let (st, v) = s
                    .get(&format!("/api/v1/chats/user/{user}?limit=200"), key)
                    .await;
                assert_eq!(st, StatusCode::OK, "{v}");
                let mut got: Vec<String> = v["chats"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["id"].as_str().unwrap().to_string())
                    .collect();
                got.sort();
                let want: Vec<String> = owned
                    .iter()
                    .filter(|(_, o)| o.0 == user)
                    .map(|(id, _)| id.clone())
                    .collect();
                assert_eq!(got, want, "tenant sees exactly its own chats of {user}");
            }
            3 => {
                if let Some(id) = pick_own(&mut rng, &owned) {
                    let (st, v) = s.get(&format!("/api/v1/chats/{id}"), key).await;
                    assert_eq!(st, StatusCode::OK, "{v}");
                    let o = &owned[&id];
                    assert_eq!(v["user_id"], o.0.as_str());
                    assert_eq!(v["title"], json!(o.1));
                    assert_eq!(v["message_count"], o.2);
                }
            }
            4 => {
                if let Some(id) = pick_own(&mut rng, &owned) {
                    let title = format!("renamed-{seed}-{step}");
                    let (st, v) = s
                        .patch(&format!("/api/v1/chats/{id}"), key, json!({"title": title}))
                        .await;
                    assert_eq!(st, StatusCode::OK, "{v}");
                    owned.get_mut(&id).unwrap().1 = Some(title);
                }
            }
            5 => {
                if let Some(id) = pick_own(&mut rng, &owned) {
                    let (st, _) = s.delete(&format!("/api/v1/chats/{id}"), key).await;
                    assert_eq!(st, StatusCode::NO_CONTENT);
                    owned.remove(&id);
                }
            }
            6 => {
                if let Some(id) = pick_own(&mut rng, &owned) {
                    let user = owned[&id].0.clone();
                    let mut ws = crate::ws::Ws::connect(s, key, &user, &id).await;
                    assert_eq!(ws.event().await["event_type"], "connection_established");
                    ws.send(json!({"content": format!("hello from {seed}")}))
                        .await;
                    let end = ws.until("message_stream_ended").await;
                    assert_eq!(end["finish_reason"], "length", "{end}");
                    owned.get_mut(&id).unwrap().2 += 2;
                }
            }
            _ => {
                // Someone else's chat (or one since deleted): always 404, never a change.
                let ids = foreign.lock().unwrap().clone();
                let theirs: Vec<&String> =
                    ids.iter().filter(|id| !owned.contains_key(*id)).collect();
                if theirs.is_empty() {
                    continue;
                }
                let id = theirs[rng.random_range(0..theirs.len())].clone();
                let p = format!("/api/v1/chats/{id}");
                let (st, v) = match rng.random_range(0..4) {
                    0 => s.get(&p, key).await,
                    1 => s.get(&format!("{p}/messages"), key).await,
                    2 => s.patch(&p, key, json!({"title": "hijacked"})).await,
                    _ => s.delete(&p, key).await,
                };
                assert_error(st, &v, 404, "chat_not_found");
                let mut ws = crate::ws::Ws::connect(s, key, "ann", &id).await;
                let e = ws.event().await;
                assert_eq!(e["code"], "chat_not_found", "{e}");
            }
        }
    }
    owned
}

/// Several tenants at once, random interleavings: afterwards each sees exactly its own
/// chats and messages (zero leaks, zero losses).
async fn random_interleavings_keep_tenants_apart(b: Backend) {
    let s = TestServer::start_full(
        b,
        confab::ServerSettings {
            quotas: confab::api::quota::QuotaDefaults {
                requests_per_minute: 1_000_000,
                ..Default::default()
            },
            ..Default::default()
        },
        crate::ws::tiny_model(None),
    )
    .await;
    let mut tenants = Vec::new();
    for i in 0..3 {
        tenants.push(s.tenant(&format!("t{i}")).await);
    }
    let foreign = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let results = futures_util::future::join_all(
        tenants
            .iter()
            .enumerate()
            .map(|(i, t)| worker(&s, &t.key, 1000 + i as u64, foreign.clone())),
    )
    .await;
    for (t, owned) in tenants.iter().zip(&results) {
        let mut seen = 0;
        for user in ["ann", "bob", "shared"] {
            let (st, v) = s
                .get(&format!("/api/v1/chats/user/{user}?limit=200"), &t.key)
                .await;
            assert_eq!(st, StatusCode::OK);
            for c in v["chats"].as_array().unwrap() {
                let id = c["id"].as_str().unwrap();
                let o = owned
                    .get(id)
                    .unwrap_or_else(|| panic!("leak: {id} listed for {user}"));
                assert_eq!(c["title"], json!(o.1));
                let (_, m) = s
                    .get(&format!("/api/v1/chats/{id}/messages?limit=200"), &t.key)
                    .await;
                assert_eq!(m["total"], o.2, "messages of {id}");
                seen += 1;
            }
        }
        assert_eq!(seen, owned.len(), "no chat lost");
    }
    s.stop().await;
}
