//! Cluster mode (`--redis-url`): several `confab serve` replicas on one PostgreSQL database
//! and one Redis, as operators run them. Real processes, real Redis, loopback only.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use std::process::{Command, Stdio};

use crate::binary::{
    messages, new_chat, reply_under_way, serve, serve_with, socket_with_message, stop,
    stored_reply, wait_ready, Served, Socket, BIN,
};
use crate::common::{fresh_store, Backend, ScratchGuard};

/// Ten replicas started at once on one empty PostgreSQL database: each migrates under the
/// advisory lock (one applies the migrations, the others find them applied), every one
/// serves, and there is one `default` tenant, whose key works on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_replicas_start_together_on_one_database() {
    let (url, _guard) = crate::common::empty_postgres().await;
    let key = "ci-known-key-replicas-0123456789";
    // A directory each: `serve` writes the tiny model file into it.
    let dirs: Vec<_> = (0..10).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas =
        futures_util::future::join_all(dirs.iter().map(|d| serve(&url, key, d.path()))).await;
    let http = reqwest::Client::new();
    for r in &replicas {
        wait_ready(&r.base).await;
        let resp = http
            .get(format!("{}/api/v1/chats/user/u", r.base))
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{}", r.base);
    }
    let store = confab::store::Store::connect(&url, &Default::default())
        .await
        .unwrap();
    assert_eq!(store.tenant_count().await.unwrap(), 1);
    for r in replicas {
        stop(r.child).await;
    }
}

/// The Redis the cluster tests use (`CONFAB_TEST_REDIS_URL`, default the local one).
fn redis_url() -> String {
    std::env::var("CONFAB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Cluster mode, two replicas on one PostgreSQL database and one Redis. The replica
/// generating a reply is killed (-9): once its one-second lease has expired the other marks
/// the reply `interrupted`, with the text saved so far. The killed replica comes back (same
/// id) while the other generates: it leaves that live reply alone, which finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_replies_are_recovered_and_a_restart_touches_only_its_own() {
    let (_store, url, _guard) = fresh_store(Backend::Postgres).await;
    let key = "ci-known-key-cluster-0123456789";
    let redis = redis_url();
    let prefix = format!("confab-test-{}", uuid::Uuid::new_v4().simple());
    let env = |id: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CONFAB_REDIS_URL", redis.clone()),
            ("CONFAB_REDIS_PREFIX", prefix.clone()),
            ("CONFAB_REPLICA_ID", id.to_string()),
            ("CONFAB_REPLICA_LEASE_SECS", "1".into()),
            ("CONFAB_DEBUG_TOKEN_INTERVAL_MS", "30".into()),
            ("CONFAB_SAVE_INTERVAL_MS", "50".into()),
        ]
    };
    fn refs<'a>(e: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        e.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
    let (env_a, env_b) = (env("replica-a"), env("replica-b"));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve_with(&url, key, dir_a.path(), &refs(&env_a)).await;
    let b = serve_with(&url, key, dir_b.path(), &refs(&env_b)).await;
    for base in [&a.base, &b.base] {
        let ready: Value = reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            (ready["status"].as_str(), ready["cluster"].as_str()),
            (Some("ready"), Some("ok")),
            "{ready}"
        );
    }

    // Killed mid-reply: the survivor recovers the reply within the lease (and its checks).
    let (chat_id, ws, streamed) = reply_under_way(&a.base, key, 10).await;
    let chat_id = chat_id.as_str();
    let mut a_child = a.child;
    a_child.kill().unwrap();
    a_child.wait().unwrap();
    drop(ws);
    let killed = std::time::Instant::now();
    let reply = loop {
        let reply = stored_reply(&b.base, key, chat_id).await;
        if reply["status"] != "streaming" {
            break reply;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "not recovered: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply["status"], "interrupted", "{reply}");
    let saved = reply["content"].as_str().unwrap();
    assert!(!saved.is_empty(), "the text saved so far is kept");
    assert!(
        streamed.starts_with(saved) || saved.starts_with(&streamed),
        "saved {saved:?} vs streamed {streamed:?}"
    );

    // A restart (same id) while the other replica generates: the live reply is left alone.
    let (chat_id, mut ws, _) = reply_under_way(&b.base, key, 5).await;
    let chat_id = chat_id.as_str();
    let a = serve_with(&url, key, dir_a.path(), &refs(&env_a)).await;
    // Started, and interrupted only its own: the other's reply is still live (alone on the
    // database, a start marks every `streaming` row interrupted).
    assert_eq!(
        stored_reply(&a.base, key, chat_id).await["status"],
        "streaming"
    );
    let ended = events_until(&mut ws, "message_stream_ended").await;
    let ended = ended.last().unwrap();
    assert!(
        ["stop", "length"].contains(&ended["finish_reason"].as_str().unwrap()),
        "{ended}"
    );
    assert_eq!(
        stored_reply(&a.base, key, chat_id).await["status"],
        "complete"
    );
    stop(a.child).await;
    stop(b.child).await;
}

/// Cluster mode: a tenant's REST rate holds across the replicas together. 100 requests a
/// minute, spread over three replicas: all 100 pass, with the remaining count going down from
/// replica to replica, and the 101st is refused whichever replica gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_rate_is_counted_across_replicas() {
    let (_store, url, _guard) = fresh_store(Backend::Postgres).await;
    let key = "ci-known-key-cluster-0123456789";
    let redis = redis_url();
    let prefix = format!("confab-test-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("CONFAB_REDIS_URL", redis.as_str()),
        ("CONFAB_REDIS_PREFIX", prefix.as_str()),
        ("CONFAB_REQUESTS_PER_MINUTE", "100"),
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas =
        futures_util::future::join_all(dirs.iter().map(|d| serve_with(&url, key, d.path(), &env)))
            .await;
    let http = reqwest::Client::new();
    let get = |i: usize| {
        http.get(format!("{}/api/v1/chats/user/u", replicas[i % 3].base))
            .header("X-API-Key", key)
            .send()
    };
    for i in 0..100 {
        let r = get(i).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "request {i}");
        assert_eq!(
            r.headers()["x-ratelimit-remaining"].to_str().unwrap(),
            (99 - i).to_string(),
            "request {i}"
        );
    }
    for i in 0..3 {
        let r = get(i).await.unwrap();
        assert_eq!(r.status().as_u16(), 429, "replica {i}");
        assert!(r.headers().contains_key("retry-after"));
    }
    for r in replicas {
        stop(r.child).await;
    }
}

/// A replica whose Redis cannot be reached serves alone, and `/readyz` says so (200,
/// `degraded`, with the reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_replica_serves_alone_and_says_degraded() {
    let (_store, url, _guard) = fresh_store(Backend::Postgres).await;
    let key = "ci-known-key-cluster-0123456789";
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let env = [("CONFAB_REDIS_URL", "redis://127.0.0.1:1")];
    let s = serve_with(&url, key, dir.path(), &env).await;
    let r = reqwest::get(format!("{}/readyz", s.base)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["cluster"], "degraded", "{ready}");
    assert!(
        ready["cluster_detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{ready}"
    );
    let (_chat, _ws, streamed) = reply_under_way(&s.base, key, 3).await;
    assert!(!streamed.is_empty());
    stop(s.child).await;
}

/// Cluster mode needs PostgreSQL: with SQLite the server refuses to start and says why.
#[test]
fn cluster_mode_on_sqlite_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--redis-url",
            "redis://127.0.0.1:6379",
        ])
        .env("CONFAB_DATA_DIR", dir.path())
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs PostgreSQL"), "{err}");
}

const KEY: &str = "ci-known-key-cluster-0123456789";

/// `n` replicas on a fresh PostgreSQL database and the test Redis (a key prefix of their
/// own), with one-second leases and a token every 30 ms.
struct Replicas {
    replicas: Vec<Served>,
    _dirs: Vec<tempfile::TempDir>,
    _db: ScratchGuard,
}

impl Replicas {
    async fn start(n: usize) -> Replicas {
        Replicas::start_with(n, &[]).await
    }

    /// With `extra` settings (environment variables) on every replica.
    async fn start_with(n: usize, extra: &[(&str, &str)]) -> Replicas {
        Replicas::start_on(&redis_url(), n, extra).await
    }

    /// On the Redis at `redis`.
    async fn start_on(redis: &str, n: usize, extra: &[(&str, &str)]) -> Replicas {
        let (_store, url, db) = fresh_store(Backend::Postgres).await;
        let prefix = format!("confab-test-{}", uuid::Uuid::new_v4().simple());
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut replicas = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let id = format!("replica-{i}");
            let mut env = vec![
                ("CONFAB_REDIS_URL", redis),
                ("CONFAB_REDIS_PREFIX", prefix.as_str()),
                ("CONFAB_REPLICA_ID", id.as_str()),
                ("CONFAB_REPLICA_LEASE_SECS", "1"),
                ("CONFAB_DEBUG_TOKEN_INTERVAL_MS", "30"),
                ("CONFAB_SAVE_INTERVAL_MS", "50"),
            ];
            env.extend_from_slice(extra);
            replicas.push(serve_with(&url, KEY, dir.path(), &env).await);
        }
        Replicas {
            replicas,
            _dirs: dirs,
            _db: db,
        }
    }

    fn base(&self, i: usize) -> &str {
        &self.replicas[i].base
    }

    /// A reply under way on replica `generating` (three tokens in), and a socket on the
    /// same chat on replica `watching`: the chat, the generating socket and the watching one.
    async fn watched_reply(&self, generating: usize, watching: usize) -> (String, Socket, Socket) {
        let (chat, ws, _) = reply_under_way(self.base(generating), KEY, 3).await;
        let watcher = open_socket(self.base(watching), &chat).await;
        (chat, ws, watcher)
    }

    async fn stop(self) {
        for r in self.replicas {
            stop(r.child).await;
        }
    }
}

/// A socket on user `u`'s chat, past its `connection_established`.
async fn open_socket(base: &str, chat_id: &str) -> Socket {
    let (ws, hello) = try_socket(base, chat_id).await;
    assert_eq!(hello["event_type"], "connection_established", "{hello}");
    ws
}

/// A socket on user `u`'s chat and its first event.
async fn try_socket(base: &str, chat_id: &str) -> (Socket, Value) {
    let url = format!(
        "{}/ws/chat?api_key={KEY}&user_id=u&chat_id={chat_id}",
        base.replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = next_event(&mut ws).await;
    (ws, first)
}

/// The next event (JSON text frame) within 20 s; `{"closed": code}` when the socket closes.
async fn next_event(ws: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("an event within 20 s");
        match frame {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(c))) => {
                return json!({"closed": c.map(|c| u16::from(c.code))});
            }
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return json!({"closed": null}),
        }
    }
}

/// Events up to and including the one of `event_type`.
async fn events_until(ws: &mut Socket, event_type: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for _ in 0..10_000 {
        let e = next_event(ws).await;
        assert!(
            e.get("closed").is_none(),
            "closed early: {e} after {events:?}"
        );
        let done = e["event_type"] == event_type;
        events.push(e);
        if done {
            return events;
        }
    }
    panic!("no {event_type}");
}

/// The `(index, token)` pairs of the token events.
fn tokens(events: &[Value]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter(|e| e["event_type"] == "message_stream_token")
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["token"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Three replicas, one chat: the reply generated on the first streams to a socket on the
/// second with the same tokens in the same order, and a socket joining on the third
/// mid-reply is caught up (the text so far in one token event) and then follows live; the
/// fan-out latency is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_streams_to_sockets_on_every_replica_in_order() {
    let c = Replicas::start(3).await;
    let chat = new_chat(c.base(0), KEY, 40).await;
    let mut watcher = open_socket(c.base(1), &chat).await;
    let mut sender = socket_with_message(c.base(0), KEY, &chat, "Hi").await;
    let mut seen_by_sender = Vec::new();
    // Five tokens in, a socket joins on the third replica (which has no room for the chat).
    while tokens(&seen_by_sender).len() < 5 {
        seen_by_sender.push(next_event(&mut sender).await);
    }
    let mut late = open_socket(c.base(2), &chat).await;
    seen_by_sender.extend(events_until(&mut sender, "message_stream_ended").await);
    let seen_by_watcher = events_until(&mut watcher, "message_stream_ended").await;
    let seen_late = events_until(&mut late, "message_stream_ended").await;

    let kinds = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["event_type"].as_str().unwrap().to_string())
            .filter(|k| {
                ![
                    "connection_established",
                    "message_stream_token",
                    "message_queued",
                ]
                .contains(&k.as_str())
            })
            .collect()
    };
    assert_eq!(
        kinds(&seen_by_watcher),
        [
            "message_received",
            "message_stream_started",
            "message_stream_ended"
        ]
    );
    assert_eq!(kinds(&seen_by_sender), kinds(&seen_by_watcher));
    assert_eq!(tokens(&seen_by_sender), tokens(&seen_by_watcher));
    assert!(tokens(&seen_by_sender).len() > 5);
    let ended = seen_by_sender.last().unwrap();
    assert_eq!(seen_by_watcher.last().unwrap()["content"], ended["content"]);
    assert_eq!(seen_late.last().unwrap()["content"], ended["content"]);
    for (i, (index, _)) in tokens(&seen_by_watcher).iter().enumerate() {
        assert_eq!(*index, i as u64, "in order, none missing");
    }

    // The late socket: started, the text so far as one token, then the live ones.
    assert_eq!(
        seen_late[0]["event_type"], "message_stream_started",
        "{seen_late:?}"
    );
    let late_tokens = tokens(&seen_late);
    let (first_index, _) = late_tokens[0];
    assert!(first_index >= 4, "caught up at once: {late_tokens:?}");
    let text: String = late_tokens.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(text, ended["content"].as_str().unwrap());
    for pair in late_tokens.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{late_tokens:?}");
    }
    assert_eq!(
        stored_reply(c.base(2), KEY, &chat).await["content"],
        ended["content"]
    );

    // The fan-out latency, measured on the replicas that relayed.
    let metrics = reqwest::get(format!("{}/metrics", c.base(1)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("confab_cluster_fanout_seconds_count "))
        .expect("the fan-out histogram")
        .parse()
        .unwrap();
    assert_eq!(count as usize, tokens(&seen_by_watcher).len());
    c.stop().await;
}

/// A reply generated on one replica is cancelled from a socket on another; two replicas
/// racing to answer one chat start exactly one reply (the other socket is told
/// `generation_in_progress`), round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_any_replica_and_one_reply_per_chat_cluster_wide() {
    let c = Replicas::start(2).await;
    let (chat, mut a, mut b) = c.watched_reply(0, 1).await;
    let caught_up = next_event(&mut b).await;
    assert_eq!(
        caught_up["event_type"], "message_stream_started",
        "{caught_up}"
    );

    // A message on the other replica while the reply runs: refused, not saved.
    b.send(Message::text(json!({"content": "me too"}).to_string()))
        .await
        .unwrap();
    let refused = loop {
        let e = next_event(&mut b).await;
        if e["event_type"] == "error" {
            break e;
        }
    };
    assert_eq!(refused["code"], "generation_in_progress", "{refused}");

    b.send(Message::text(json!({"type": "cancel"}).to_string()))
        .await
        .unwrap();
    for ws in [&mut a, &mut b] {
        let ended = events_until(ws, "message_stream_ended").await;
        assert_eq!(ended.last().unwrap()["finish_reason"], "cancelled");
    }
    assert_eq!(
        stored_reply(c.base(1), KEY, &chat).await["status"],
        "cancelled"
    );

    // Both replicas at once, three rounds: one reply each round.
    let rounds = 3;
    for round in 0..rounds {
        let text = json!({"content": format!("round {round}")}).to_string();
        let (ra, rb) = tokio::join!(
            a.send(Message::text(text.clone())),
            b.send(Message::text(text.clone()))
        );
        ra.unwrap();
        rb.unwrap();
        // Each socket sees the one reply start; exactly one was refused (the refusal may
        // come before the start or after it).
        let refused = |events: Vec<Value>| {
            events
                .iter()
                .filter(|e| e["code"] == "generation_in_progress")
                .count()
        };
        let mut refusals = 0;
        for ws in [&mut a, &mut b] {
            refusals += refused(events_until(ws, "message_stream_started").await);
        }
        b.send(Message::text(json!({"type": "cancel"}).to_string()))
            .await
            .unwrap();
        for ws in [&mut a, &mut b] {
            refusals += refused(events_until(ws, "message_stream_ended").await);
        }
        assert_eq!(refusals, 1, "round {round}");
    }
    let stored = messages(c.base(0), KEY, &chat).await;
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    let expected: Vec<&str> = ["user", "assistant"].repeat(1 + rounds);
    assert_eq!(roles, expected);
    c.stop().await;
}

/// Deleting a chat on one replica closes its sockets on every replica with 4404, and stops
/// its reply wherever it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_chat_closes_its_sockets_on_every_replica() {
    let c = Replicas::start(3).await;
    let (chat, mut generating, mut watcher) = c.watched_reply(1, 2).await;
    let r = reqwest::Client::new()
        .delete(format!("{}/api/v1/chats/{chat}", c.base(0)))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    for ws in [&mut generating, &mut watcher] {
        let closed = loop {
            let e = next_event(ws).await;
            if e.get("closed").is_some() {
                break e;
            }
            assert_ne!(e["event_type"], "message_stream_ended", "{e}");
        };
        assert_eq!(closed["closed"], 4404, "{closed}");
    }
    c.stop().await;
}

/// The model's title for a new chat reaches the chat's sockets on every replica: the one
/// that wrote it tells its own, Redis the others (each gets `chat_updated` once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_title_reaches_sockets_on_every_replica() {
    let c = Replicas::start(2).await;
    let chat = new_chat(c.base(0), KEY, 4).await;
    let mut watcher = open_socket(c.base(1), &chat).await;
    let mut sender = socket_with_message(c.base(0), KEY, &chat, "Plan a trip to Paris").await;
    let mut titles = Vec::new();
    for ws in [&mut sender, &mut watcher] {
        let seen = events_until(ws, "chat_updated").await;
        let updated = seen.last().unwrap().clone();
        assert_eq!(updated["chat_id"], chat.as_str(), "{updated}");
        titles.push(updated["title"].as_str().unwrap().to_string());
    }
    assert_eq!(titles[0], titles[1]);
    let stored: Value = reqwest::Client::new()
        .get(format!("{}/api/v1/chats/{chat}", c.base(1)))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["title"], titles[0].as_str());
    // Once each: a ping answered after it shows no second copy was queued before it.
    for ws in [&mut sender, &mut watcher] {
        ws.send(Message::text(json!({"type": "ping"}).to_string()))
            .await
            .unwrap();
        let rest = events_until(ws, "pong").await;
        assert!(
            rest.iter().all(|e| e["event_type"] != "chat_updated"),
            "{rest:?}"
        );
    }
    c.stop().await;
}

/// The replica generating a reply is killed (-9): a socket watching on another replica
/// gets the end of the stream (`interrupted`, the text saved so far) once the lease has
/// expired, and the chat takes a new reply there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_reply_ends_on_sockets_elsewhere() {
    let mut c = Replicas::start(2).await;
    let (chat, generating, mut watcher) = c.watched_reply(0, 1).await;
    events_until(&mut watcher, "message_stream_token").await;
    let killed = std::time::Instant::now();
    c.replicas[0].child.kill().unwrap();
    c.replicas[0].child.wait().unwrap();
    drop(generating);
    let ended = events_until(&mut watcher, "message_stream_ended").await;
    let ended = ended.last().unwrap();
    assert_eq!(ended["finish_reason"], "interrupted", "{ended}");
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    let stored = stored_reply(c.base(1), KEY, &chat).await;
    assert_eq!(stored["status"], "interrupted");
    assert_eq!(stored["content"], ended["content"]);

    watcher
        .send(Message::text(json!({"content": "again"}).to_string()))
        .await
        .unwrap();
    let next = next_event(&mut watcher).await;
    assert_eq!(next["event_type"], "message_received", "{next}");
    let dead = c.replicas.remove(0);
    drop(dead);
    c.stop().await;
}

/// A tenant's WebSocket connection cap (4) holds for the three replicas together: four
/// sockets spread over them, then a fifth is refused on every replica; once one closes, a
/// socket is accepted again (on another replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_across_replicas() {
    let c = Replicas::start_with(3, &[("CONFAB_MAX_CONNECTIONS_PER_TENANT", "4")]).await;
    let chat = new_chat(c.base(0), KEY, 4).await;
    let mut open = Vec::new();
    for i in [0, 1, 2, 0] {
        open.push(open_socket(c.base(i), &chat).await);
    }
    for i in 0..3 {
        let (_ws, first) = try_socket(c.base(i), &chat).await;
        assert_eq!(
            first["code"], "too_many_connections",
            "replica {i}: {first}"
        );
        assert_eq!(first["details"]["limit"], 4, "{first}");
    }
    let mut closing = open.remove(1);
    closing.close(None).await.unwrap();
    drop(closing);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ws, first) = try_socket(c.base(2), &chat).await;
        if first["event_type"] == "connection_established" {
            open.push(ws);
            break;
        }
        assert_eq!(first["code"], "too_many_connections", "{first}");
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(open);
    c.stop().await;
}

/// A tenant's reply queue (2 places) holds for the replicas together. One reply slot per
/// replica: on the first replica one reply runs and two wait, so the queue is full; the
/// second replica still starts a reply in its own free slot, but one more there would wait,
/// and the cluster's queue has no place: `queue_full`, nothing saved (and the same for the
/// OpenAI-compatible API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_queue_holds_across_replicas() {
    let c = Replicas::start_with(
        2,
        &[("CONFAB_MAX_BATCH", "1"), ("CONFAB_QUEUE_PER_TENANT", "2")],
    )
    .await;
    let mut sockets = Vec::new();
    for (i, replica) in [0, 0, 0, 1].into_iter().enumerate() {
        let chat = new_chat(c.base(replica), KEY, 300).await;
        let mut ws = socket_with_message(c.base(replica), KEY, &chat, "go").await;
        let events = events_until(&mut ws, "message_received").await;
        assert!(
            events.iter().all(|e| e["event_type"] != "error"),
            "reply {i}: {events:?}"
        );
        sockets.push((chat, ws));
    }
    let chat = new_chat(c.base(1), KEY, 300).await;
    let mut ws = socket_with_message(c.base(1), KEY, &chat, "one too many").await;
    let refused = loop {
        let e = next_event(&mut ws).await;
        if e["event_type"] == "error" {
            break e;
        }
    };
    assert_eq!(refused["code"], "queue_full", "{refused}");
    // The OpenAI-compatible API waits in the same queues.
    let http = reqwest::Client::new();
    let models: Value = http
        .get(format!("{}/v1/models", c.base(1)))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let model = models["data"][0]["id"].clone();
    let r = http
        .post(format!("{}/v1/chat/completions", c.base(1)))
        .bearer_auth(KEY)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    assert_eq!(
        messages(c.base(0), KEY, &chat).await,
        Vec::<Value>::new(),
        "not saved"
    );
    for (_, ws) in &mut sockets {
        ws.send(Message::text(json!({"type": "cancel"}).to_string()))
            .await
            .unwrap();
    }
    drop(sockets);
    c.stop().await;
}

/// nginx (Debian's package) running `deploy/nginx/confab.conf` in front of `replicas`: only
/// its `listen` port and its `include` of the replica list are changed. Stopped on drop.
struct Nginx {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    async fn start(replicas: &Replicas) -> Nginx {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nginx is missing: apt-get install nginx (.ci/run does)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        // nginx's workers may run as another user: they need to reach their temp paths.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let servers: String = replicas
            .replicas
            .iter()
            .map(|r| format!("server {};\n", r.base.trim_start_matches("http://")))
            .collect();
        let deploy = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/confab.conf"),
        )
        .unwrap();
        assert!(
            deploy.contains("listen 8080;")
                && deploy.contains("include /etc/confab/replicas.conf;")
        );
        let site = deploy
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replace("include /etc/confab/replicas.conf;", &servers);
        let d = dir.path().display();
        let temp: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| {
                let path = dir.path().join(t);
                std::fs::create_dir(&path).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
                format!("{t}_temp_path {};\n", path.display())
            })
            .collect();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\nhttp {{\naccess_log off;\n{temp}{site}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start nginx");
        let base = format!("http://127.0.0.1:{port}");
        let nginx = Nginx {
            child,
            base,
            _dir: dir,
        };
        for _ in 0..100 {
            if reqwest::get(format!("{}/healthz", nginx.base))
                .await
                .is_ok()
            {
                return nginx;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(nginx._dir.path().join("stderr.log")).unwrap_or_default();
        panic!("nginx did not start: {log}");
    }
}

/// The replica that answered (`X-Confab-Replica`).
fn replica_of(headers: &reqwest::header::HeaderMap) -> String {
    headers["x-confab-replica"].to_str().unwrap().to_string()
}

/// Three replicas behind `deploy/nginx/confab.conf`: each chat's REST calls (by path or
/// `X-Chat-ID`) and its WebSocket (by `chat_id`) reach one replica, the chats spread over
/// the replicas, a reply streams through nginx, and `confab bench serve` runs unchanged
/// against the front, its watching sockets on the replicas behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_keeps_each_chat_on_one_replica() {
    let c = Replicas::start(3).await;
    let front = Nginx::start(&c).await;
    let http = reqwest::Client::new();
    let mut homes = std::collections::HashSet::new();
    for _ in 0..12 {
        let chat = new_chat(&front.base, KEY, 4).await;
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = http
                .get(format!("{}/api/v1/chats/{chat}/messages", front.base))
                .header("X-API-Key", KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            seen.push(replica_of(r.headers()));
        }
        let r = http
            .get(format!("{}/api/v1/chats/user/u", front.base))
            .header("X-API-Key", KEY)
            .header("X-Chat-ID", &chat)
            .send()
            .await
            .unwrap();
        seen.push(replica_of(r.headers()));
        let url = format!(
            "{}/ws/chat?api_key={KEY}&user_id=u&chat_id={chat}",
            front.base.replacen("http", "ws", 1)
        );
        let (_ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
        seen.push(
            response.headers()["x-confab-replica"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        assert!(seen.iter().all(|r| *r == seen[0]), "{chat}: {seen:?}");
        homes.insert(seen[0].clone());
    }
    assert!(
        homes.len() >= 2,
        "chats spread over the replicas: {homes:?}"
    );

    // A reply through the front.
    let chat = new_chat(&front.base, KEY, 8).await;
    let mut ws = socket_with_message(&front.base, KEY, &chat, "Hi").await;
    let events = events_until(&mut ws, "message_stream_ended").await;
    assert!(!tokens(&events).is_empty());

    // The benchmark, unchanged, with watching sockets on the replicas themselves.
    let out = Command::new(BIN)
        .args(["bench", "serve", "--url", &front.base, "--api-key", KEY])
        .args([
            "--chats",
            "3",
            "--turns",
            "2",
            "--max-tokens",
            "6",
            "--json",
        ])
        .args(["--watch-url", c.base(0), "--watch-url", c.base(1)])
        .args(["--watch-url", c.base(2)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["replies"], 6, "{report}");
    assert!(
        report["fanout_lag_ms"]["count"].as_u64().unwrap() > 0,
        "{report}"
    );
    drop(front);
    c.stop().await;
}

/// A Redis of the test's own (Debian's `redis-server`) on a free loopback port, so it can be
/// stopped and started again without touching the shared one. Stopped on drop.
struct OwnRedis {
    child: Option<std::process::Child>,
    port: u16,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = OwnRedis { child: None, port };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts it, empty, on the same port, and waits until it answers.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is missing: apt-get install redis-server (.ci/run does)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on {}", self.port);
    }

    /// Kills it (-9): everything it held is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn readyz_cluster(base: &str) -> String {
    let ready: Value = reqwest::get(format!("{base}/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ready["cluster"].as_str().unwrap_or_default().to_string()
}

/// One chat's conversation: sends messages one after another until `stop`, waiting for
/// each reply's end; returns the ids of the user messages the server acknowledged
/// (`message_received`).
async fn converse_until(mut ws: Socket, stop: tokio::time::Instant) -> (Socket, Vec<String>) {
    let mut acknowledged = Vec::new();
    let mut turn = 0;
    while tokio::time::Instant::now() < stop {
        turn += 1;
        ws.send(Message::text(
            json!({"content": format!("turn {turn}")}).to_string(),
        ))
        .await
        .unwrap();
        loop {
            let e = next_event(&mut ws).await;
            assert!(e.get("closed").is_none(), "{e}");
            match e["event_type"].as_str() {
                Some("message_received") => {
                    acknowledged.push(e["message_id"].as_str().unwrap().to_string())
                }
                Some("message_stream_ended") => break,
                Some("error") if e["code"] != "generation_failed" => {
                    // Refused (not saved): try again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
                _ => {}
            }
        }
    }
    (ws, acknowledged)
}

/// Redis killed and started again (empty) while two replicas answer four chats: the
/// replicas serve alone meanwhile and say `degraded`, come back to `ok` by themselves, no
/// acknowledged message is lost (each has its reply, finished), and afterwards the chats'
/// sockets on the other replica follow the replies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_and_back_under_load_loses_nothing() {
    let mut redis = OwnRedis::start();
    let c = Replicas::start_on(&redis.url(), 2, &[]).await;
    let mut chats = Vec::new();
    let mut watchers = Vec::new();
    let mut talks = Vec::new();
    let stop = tokio::time::Instant::now() + Duration::from_secs(6);
    for i in 0..4 {
        let (home, other) = (i % 2, 1 - i % 2);
        let chat = new_chat(c.base(home), KEY, 6).await;
        watchers.push(open_socket(c.base(other), &chat).await);
        let ws = open_socket(c.base(home), &chat).await;
        talks.push(tokio::spawn(converse_until(ws, stop)));
        chats.push((chat, home));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while readyz_cluster(c.base(0)).await != "degraded" {
        assert!(std::time::Instant::now() < deadline, "never said degraded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    let mut senders = Vec::new();
    let mut acknowledged = Vec::new();
    for t in talks {
        let (ws, acked) = t.await.unwrap();
        senders.push(ws);
        acknowledged.push(acked);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for i in 0..2 {
        while readyz_cluster(c.base(i)).await != "ok" {
            assert!(
                std::time::Instant::now() < deadline,
                "replica {i} never rejoined"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Nothing acknowledged is lost: every user message is stored, and answered.
    for ((chat, _), acked) in chats.iter().zip(&acknowledged) {
        assert!(acked.len() >= 3, "the chat went on: {acked:?}");
        let messages = messages(c.base(0), KEY, chat).await;
        for id in acked {
            let at = messages
                .iter()
                .position(|m| m["id"] == id.as_str())
                .unwrap_or_else(|| panic!("acknowledged {id} is stored"));
            let reply = &messages[at + 1];
            assert_eq!(reply["role"], "assistant", "{reply}");
            assert_ne!(reply["status"], "streaming", "{reply}");
        }
    }

    // The sockets on the other replicas follow the chats again.
    for (i, (mut ws, mut watcher)) in senders.into_iter().zip(watchers).enumerate() {
        ws.send(Message::text(json!({"content": "after"}).to_string()))
            .await
            .unwrap();
        let ended = events_until(&mut ws, "message_stream_ended").await;
        let ended = ended.last().unwrap().clone();
        let seen = loop {
            let e = next_event(&mut watcher).await;
            assert!(e.get("closed").is_none(), "chat {i}: {e}");
            if e["event_type"] == "message_stream_ended" && e["message_id"] == ended["message_id"] {
                break e;
            }
        };
        assert_eq!(seen["content"], ended["content"], "chat {i}");
    }
    c.stop().await;
}

/// A client that answers each `message_stream_ended` at once is never told
/// `generation_in_progress`: the reply lock is released before the next message claims it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_turns_are_never_refused() {
    let c = Replicas::start(2).await;
    let chat = new_chat(c.base(0), KEY, 2).await;
    let mut watcher = open_socket(c.base(1), &chat).await;
    let mut ws = open_socket(c.base(0), &chat).await;
    for turn in 0..15 {
        ws.send(Message::text(
            json!({"content": format!("turn {turn}")}).to_string(),
        ))
        .await
        .unwrap();
        let events = events_until(&mut ws, "message_stream_ended").await;
        assert!(
            events.iter().all(|e| e["event_type"] != "error"),
            "turn {turn}: {events:?}"
        );
    }
    // The other replica's socket saw every reply end.
    for turn in 0..15 {
        let events = events_until(&mut watcher, "message_stream_ended").await;
        assert!(
            events.iter().all(|e| e["event_type"] != "error"),
            "turn {turn}"
        );
    }
    c.stop().await;
}
