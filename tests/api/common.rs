//! The test harness: a real server on 127.0.0.1:0 over a fresh database per test, SQLite
//! (a temporary file) or PostgreSQL (a new database, dropped afterwards).

use std::time::Duration;

use confab::credentials;
use confab::domain::{MessageStatus, NewMessage, Parent, Role};
use confab::store::{Store, StoreOptions, TenantId};
use confab::ServerSettings;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests use; its `postgres` database is only used to create and drop
/// the per-test databases.
pub fn pg_admin_url() -> String {
    std::env::var("CONFAB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn pg_url_for(db: &str) -> String {
    let admin = pg_admin_url();
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin);
    format!("{base}/{db}")
}

async fn pg_exec(sql: &str) {
    use sea_orm::{ConnectionTrait, Database};
    let db = Database::connect(pg_admin_url()).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is needed for the postgres tests and is not reachable at {} ({e}). \
             Start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) \
             or point CONFAB_TEST_POSTGRES_URL at one.",
            pg_admin_url()
        )
    });
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    db.close().await.ok();
}

/// Server warnings and errors go to the test's captured output, so a failing test shows
/// what the server logged (`CONFAB_TEST_LOG` sets another filter).
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("CONFAB_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

/// Where a test's data lives; removed when the test ends.
enum Scratch {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(String),
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Scratch::Postgres(name) = self {
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            // Drop runs outside any runtime we may block; use a thread with its own.
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(pg_exec(&sql));
                }
            })
            .join();
        }
    }
}

/// A fresh, migrated database of the given kind.
pub async fn fresh_store(backend: Backend) -> (Store, String, ScratchGuard) {
    let (url, scratch) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("confab.db").display()
            );
            (url, Scratch::Sqlite(dir))
        }
        Backend::Postgres => {
            let name = format!("confab_test_{}", Uuid::new_v4().simple());
            pg_exec(&format!("CREATE DATABASE \"{name}\"")).await;
            (pg_url_for(&name), Scratch::Postgres(name))
        }
    };
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .expect("connect and migrate");
    (store, url, ScratchGuard(scratch))
}

/// A new, empty PostgreSQL database (no migrations run): what a first deployment starts on.
pub async fn empty_postgres() -> (String, ScratchGuard) {
    let name = format!("confab_test_{}", Uuid::new_v4().simple());
    pg_exec(&format!("CREATE DATABASE \"{name}\"")).await;
    (pg_url_for(&name), ScratchGuard(Scratch::Postgres(name)))
}

/// Keeps a test's database alive; removes it on drop.
pub struct ScratchGuard(#[allow(dead_code)] Scratch);

pub struct TestServer {
    pub base: String,
    /// The database URL (empty for `start_on`, whose database is the test's).
    pub db_url: String,
    pub store: Store,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _scratch: ScratchGuard,
}

/// A tenant made for a test.
pub struct Tenant {
    pub id: TenantId,
    pub key: String,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, ServerSettings::default()).await
    }

    pub async fn start_with(backend: Backend, settings: ServerSettings) -> TestServer {
        let model = confab::engine::ModelSlot::new(confab::engine::ModelStatus::NotConfigured);
        Self::start_full(backend, settings, model).await
    }

    /// A server without a model over a store the test made itself (its database is the
    /// test's business).
    pub async fn start_on(store: Store, settings: ServerSettings) -> TestServer {
        let model = confab::engine::ModelSlot::new(confab::engine::ModelStatus::NotConfigured);
        let dir = tempfile::tempdir().expect("temp dir");
        let scratch = ScratchGuard(Scratch::Sqlite(dir));
        Self::serve(store, String::new(), settings, model, scratch).await
    }

    /// A server with a model (see `ws::tiny_model`).
    pub async fn start_full(
        backend: Backend,
        settings: ServerSettings,
        model: confab::engine::ModelSlot,
    ) -> TestServer {
        let (store, url, scratch) = fresh_store(backend).await;
        Self::serve(store, url, settings, model, scratch).await
    }

    async fn serve(
        store: Store,
        db_url: String,
        settings: ServerSettings,
        model: confab::engine::ModelSlot,
        scratch: ScratchGuard,
    ) -> TestServer {
        init_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(confab::run(
            store.clone(),
            model,
            settings,
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        TestServer {
            base: format!("http://{addr}"),
            db_url,
            store,
            http,
            shutdown: Some(tx),
            task: Some(task),
            _scratch: scratch,
        }
    }

    pub async fn tenant(&self, name: &str) -> Tenant {
        let key = credentials::generate();
        self.store
            .create_tenant(name, &key)
            .await
            .expect("create tenant");
        let id = self
            .store
            .authenticate(&key.hash)
            .await
            .expect("lookup")
            .expect("key works")
            .tenant()
            .expect("a tenant key");
        Tenant {
            id,
            key: key.secret,
        }
    }

    /// Sends a request with an optional key and JSON body; returns status and JSON body
    /// (Null when the body is empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(k) = key {
            req = req.header("X-API-Key", k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("non-JSON body ({e}) for {path}: {text}"))
        };
        (status, json)
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(key), None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(key), Some(body)).await
    }

    pub async fn patch(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(key), Some(body)).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(key), None).await
    }

    /// Creates a chat and returns its JSON.
    pub async fn create_chat(&self, key: &str, body: Value) -> Value {
        let (s, v) = self.post("/api/v1/chats/", key, body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// Stores `n` alternating user/assistant messages directly (the REST API has no write
    /// route for messages; the WebSocket chat creates them).
    pub async fn add_messages(&self, tenant: TenantId, chat_id: &str, n: usize) {
        for i in 0..n {
            let role = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            let text = format!("message {}", i + 1);
            self.add_message(tenant, chat_id, Parent::Active, role, &text, json!({}))
                .await;
        }
    }

    /// Stores one complete message directly, under `parent` of the chat's tree, with
    /// `metadata` (a JSON object); returns its id.
    pub async fn add_message(
        &self,
        tenant: TenantId,
        chat_id: &str,
        parent: Parent,
        role: Role,
        text: &str,
        metadata: Value,
    ) -> Uuid {
        self.store
            .tenant(tenant)
            .append_message(
                chat_id.parse().expect("uuid"),
                NewMessage {
                    role,
                    content: text.into(),
                    metadata: serde_json::from_value(metadata).expect("an object"),
                    status: MessageStatus::Complete,
                    parent,
                },
            )
            .await
            .expect("append")
            .id
    }

    /// Shuts the server down gracefully; the returned guard keeps its database until dropped.
    pub async fn stop(mut self) -> ScratchGuard {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server result");
        }
        self._scratch
    }
}

/// Asserts the error shape and code of a response and returns its `details`.
pub fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: &str) -> Value {
    assert_eq!(status.as_u16(), want_status, "{body}");
    let err = &body["error"];
    assert_eq!(err["code"], want_code, "{body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["details"].is_object(), "{body}");
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error` at top level: {body}"
    );
    err["details"].clone()
}

/// Runs each listed `async fn(Backend)` as two tests, `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Runs a script of `tests/clients/` with the venv of `tests/clients/python-env` (the
/// official client packages, pinned) against a live server: `script BASE_URL KEY`; returns
/// the JSON it prints. The clients' own request timeouts bound it.
pub async fn run_python_client(script: &str, base: &str, key: &str) -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let env = std::process::Command::new(format!("{root}/tests/clients/python-env"))
        .output()
        .expect("run tests/clients/python-env");
    assert!(
        env.status.success(),
        "tests/clients/python-env failed (it makes a venv with the client packages from PyPI): {}",
        String::from_utf8_lossy(&env.stderr)
    );
    let python = String::from_utf8_lossy(&env.stdout).trim().to_string();
    let mut client = std::process::Command::new(&python);
    client
        .arg(format!("{root}/tests/clients/{script}"))
        .arg(base)
        .arg(key);
    let out = tokio::task::spawn_blocking(move || client.output())
        .await
        .unwrap()
        .expect("run the client");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the client prints JSON")
}

/// Runs the `confab` binary with `args`, `input` on its stdin and warnings-only logs; returns
/// (success, stdout, stderr).
pub fn run_confab(args: &[&str], input: &str) -> (bool, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .env("CONFAB_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run confab");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("confab output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
