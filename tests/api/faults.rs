//! Database faults: PostgreSQL stops under a running server, requests get a quick
//! 503 `database_unavailable` (no hang, no 500), and the server recovers by itself when the
//! database comes back.
//!
//! Uses a private PostgreSQL cluster (initdb into a temporary directory, its own port), so
//! stopping it disturbs no other test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use confab::store::{Store, StoreOptions};
use confab::ServerSettings;
use serde_json::json;

use crate::common::{assert_error, TestServer};

/// The newest installed PostgreSQL's binaries.
fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL server binaries under /usr/lib/postgresql (Debian's postgresql package)",
        )
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("bin").join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
        .join("bin")
        .join(name)
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(tool: &str, args: &[&str]) -> std::process::Output {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let bin = pg_bin(tool);
    let out = if is_root {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&bin)
            .args(args)
            .output()
    } else {
        Command::new(&bin).args(args).output()
    };
    out.unwrap_or_else(|e| panic!("{}: {e}", bin.display()))
}

/// Starts and stops the private cluster (cheap to clone into blocking tasks).
#[derive(Clone)]
struct Ctl {
    root: PathBuf,
    port: u16,
}

impl Ctl {
    fn data(&self) -> String {
        self.root.join("data").display().to_string()
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.root.display()
        );
        let log = self.root.join("pg.log").display().to_string();
        let out = as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(Path::new(&log)).unwrap_or_default()
        );
    }

    fn stop(&self) {
        let out = as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

/// A private cluster: initialised and started on creation, stopped and removed on drop.
struct Cluster {
    _dir: tempfile::TempDir,
    ctl: Ctl,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("confab-pg-")
            .tempdir()
            .expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        // The postgres user must own the directory.
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let ctl = Ctl {
            root: dir.path().to_path_buf(),
            port,
        };
        let out = as_postgres(
            "initdb",
            &[
                "-D",
                &ctl.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ctl.start();
        Cluster { _dir: dir, ctl }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &["-D", &self.ctl.data(), "-m", "immediate", "stop"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_away_gives_503_and_the_server_recovers() {
    let pg = tokio::task::spawn_blocking(Cluster::new).await.unwrap();
    let opts = StoreOptions {
        acquire_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let ctl = pg.ctl.clone();
    let store = Store::connect(&ctl.url(), &opts).await.expect("connect");
    let settings = ServerSettings {
        // Key lookups are cached this long; the outage must reach them too.
        auth_cache_ttl: Duration::from_millis(200),
        ..Default::default()
    };
    let s = TestServer::start_on(store, settings).await;
    let t = s.tenant("acme").await;
    let chat = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    let chat_id = chat["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/chats/{chat_id}");

    let c = ctl.clone();
    tokio::task::spawn_blocking(move || c.stop()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every kind of request answers quickly with 503 and the one error shape.
    for (method, p, body) in [
        (reqwest::Method::GET, path.clone(), None),
        (reqwest::Method::GET, format!("{path}/messages"), None),
        (
            reqwest::Method::POST,
            "/api/v1/chats".to_string(),
            Some(json!({"user_id": "u"})),
        ),
        (
            reqwest::Method::PATCH,
            path.clone(),
            Some(json!({"title": "x"})),
        ),
    ] {
        let started = Instant::now();
        let (st, v) = s.call(method.clone(), &p, Some(&t.key), body).await;
        assert_error(st, &v, 503, "database_unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{method} {p} took {:?}",
            started.elapsed()
        );
    }
    let (st, v) = s.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(st.as_u16(), 503, "{v}");
    assert_eq!(
        s.call(reqwest::Method::GET, "/healthz", None, None)
            .await
            .0
            .as_u16(),
        200,
        "alive while the database is down"
    );

    // Back up: the server recovers without a restart.
    let c = ctl.clone();
    tokio::task::spawn_blocking(move || c.start())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = s.get(&path, &t.key).await;
        if st.as_u16() == 200 {
            assert_eq!(v["id"], chat_id.as_str());
            break;
        }
        assert_error(st, &v, 503, "database_unavailable");
        assert!(Instant::now() < deadline, "not recovered within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created = s.create_chat(&t.key, json!({"user_id": "u"})).await;
    assert!(created["id"].is_string());
    s.stop().await;
    drop(pg);
}
