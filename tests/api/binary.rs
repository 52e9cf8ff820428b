//! The `confab` binary itself: admin subcommands, `openapi`, and `serve` with bootstrap.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{fresh_store, Backend};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_confab");

fn confab(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env("CONFAB_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run confab");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn admin_commands(b: Backend) {
    let (_store, url, _guard) = fresh_store(b).await;
    let url2 = url.clone();
    tokio::task::spawn_blocking(move || {
        let url = url2;
        let (ok, out, err) = confab(&url, &["tenant", "create", "acme", "--json"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(out.trim()).expect("json");
        let key = v["api_key"].as_str().unwrap().to_string();
        assert!(key.starts_with("cfk_") && key.len() == 44);
        assert!(v["tenant"]["id"]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .is_ok());
        assert_eq!(v["key"]["tenant_id"], v["tenant"]["id"]);
        assert_eq!(v["key"]["state"], "active");

        let (ok, _, err) = confab(&url, &["tenant", "create", "acme"]);
        assert!(!ok);
        assert!(err.contains("already exists"), "{err}");
        let (ok, _, err) = confab(&url, &["tenant", "create", "bad name!"]);
        assert!(!ok);
        assert!(err.contains("invalid tenant name"), "{err}");

        // Per-tenant limits: set, keep what is not named, back to the default.
        let limits = |args: &[&str]| {
            let mut all = vec!["tenant", "set-limits", "acme", "--json"];
            all.extend_from_slice(args);
            let (ok, out, err) = confab(&url, &all);
            assert!(ok, "{err}");
            let v: Value = serde_json::from_str(out.trim()).expect("json");
            v["limits"].clone()
        };
        let l = limits(&["--requests-per-minute", "5", "--max-connections", "2"]);
        assert_eq!(
            l,
            json!({"requests_per_minute": 5, "ws_messages_per_second": null, "max_connections": 2})
        );
        let l = limits(&[
            "--ws-messages-per-second",
            "3",
            "--max-connections",
            "default",
        ]);
        assert_eq!(
            l,
            json!({"requests_per_minute": 5, "ws_messages_per_second": 3, "max_connections": null})
        );
        let (ok, _, err) = confab(
            &url,
            &["tenant", "set-limits", "acme", "--requests-per-minute", "0"],
        );
        assert!(!ok);
        assert!(err.contains("not a limit"), "{err}");
        let (ok, _, err) = confab(
            &url,
            &["tenant", "set-limits", "nobody", "--max-connections", "1"],
        );
        assert!(!ok, "{err}");

        let (ok, out, _) = confab(&url, &["tenant", "list", "--json"]);
        assert!(ok);
        let list: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(list["tenants"][0]["name"], "acme");
        assert_eq!(list["tenants"][0]["active_keys"], 1);
        assert_eq!(list["total"], 1);

        let (ok, out, err) = confab(
            &url,
            &[
                "key",
                "create",
                "acme",
                "--name",
                "billing export",
                "--expires-at",
                "2099-01-31",
                "--json",
            ],
        );
        assert!(ok, "{err}");
        let created: Value = serde_json::from_str(out.trim()).unwrap();
        let k2 = created["key"].clone();
        assert_eq!(k2["name"], "billing export");
        let (ok, out, _) = confab(&url, &["key", "list", "acme", "--json"]);
        assert!(ok);
        let keys: Value = serde_json::from_str(out.trim()).unwrap();
        let keys = keys["keys"].clone();
        assert_eq!(keys.as_array().unwrap().len(), 2);
        assert!(!out.contains(&key), "listings never show secrets");
        let named = keys
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["prefix"] == k2["prefix"])
            .unwrap();
        assert_eq!(named["name"], "billing export");
        assert!(
            named["expires_at"]
                .as_str()
                .is_some_and(|t| t.starts_with("2099-01-31T00:00:00")),
            "{named}"
        );
        let (ok, out, _) = confab(&url, &["key", "list", "acme"]);
        assert!(
            ok && out.contains("billing export") && out.contains("2099-01-31"),
            "{out}"
        );
        for (flag, value, says) in [
            ("--expires-at", "2001-01-01", "not in the future"),
            ("--expires-at", "next week", "neither RFC 3339"),
            ("--name", "", "1 to 100 characters"),
        ] {
            let (ok, _, err) = confab(&url, &["key", "create", "acme", flag, value]);
            assert!(!ok, "{flag} {value}");
            assert!(err.contains(says), "{flag} {value}: {err}");
        }

        let prefix = k2["prefix"].as_str().unwrap();
        let (ok, out, err) = confab(&url, &["key", "revoke", prefix]);
        assert!(ok, "{err}");
        assert!(out.contains("revoked"));
        let (ok, _, err) = confab(&url, &["key", "revoke", prefix]);
        assert!(!ok);
        assert!(err.contains("no working key"), "{err}");
        let (ok, _, err) = confab(&url, &["key", "create", "ghost"]);
        assert!(!ok);
        assert!(err.contains("no tenant named"), "{err}");
        let (ok, out, _) = confab(&url, &["tenant", "list", "--json"]);
        assert!(ok);
        let list: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(list["tenants"][0]["active_keys"], 1);

        // Rename, disable, enable, delete.
        let tenant = |args: &[&str]| {
            let (ok, out, err) = confab(&url, args);
            assert!(ok, "{args:?}: {err}");
            serde_json::from_str::<Value>(out.trim()).expect("json")
        };
        let t = tenant(&[
            "tenant",
            "set-budgets",
            "acme",
            "--tokens-per-day",
            "5000",
            "--user-tokens-per-month",
            "700",
            "--json",
        ]);
        assert_eq!(
            t["budgets"],
            json!({"tokens_per_day": 5000, "tokens_per_month": null,
                "user_tokens_per_day": null, "user_tokens_per_month": 700})
        );
        let t = tenant(&[
            "tenant",
            "set-budgets",
            "acme",
            "--tokens-per-day",
            "none",
            "--json",
        ]);
        assert_eq!(t["budgets"]["tokens_per_day"], Value::Null);
        assert_eq!(t["budgets"]["user_tokens_per_month"], 700);
        let (ok, _, err) = confab(
            &url,
            &["tenant", "set-budgets", "acme", "--tokens-per-day", "0"],
        );
        assert!(!ok && err.contains("not a budget"), "{err}");
        let t = tenant(&["tenant", "rename", "acme", "acme-corp", "--json"]);
        assert_eq!(t["name"], "acme-corp");
        let t = tenant(&["tenant", "disable", "acme-corp", "--json"]);
        assert_eq!(t["disabled"], true);
        assert!(t["disabled_at"].is_string());
        let t = tenant(&["tenant", "show", "acme-corp", "--json"]);
        assert_eq!(t["disabled"], true);
        let t = tenant(&["tenant", "enable", "acme-corp", "--json"]);
        assert_eq!(t["disabled"], false);
        assert_eq!(t["disabled_at"], Value::Null);
        let (ok, _, err) = confab(&url, &["tenant", "delete", "acme-corp"]);
        assert!(!ok && err.contains("--yes"), "{err}");
        let (ok, out, err) = confab(&url, &["tenant", "delete", "acme-corp", "--yes"]);
        assert!(ok && out.contains("deleted"), "{err}");
        let (ok, _, err) = confab(&url, &["tenant", "show", "acme-corp"]);
        assert!(!ok && err.contains("no tenant named"), "{err}");

        // Admin keys: their own kind, listed apart from tenants' keys.
        let created = tenant(&["admin", "key", "create", "--name", "ops", "--json"]);
        let secret = created["api_key"].as_str().unwrap();
        assert!(secret.starts_with("cfa_") && secret.len() == 44, "{secret}");
        assert_eq!(created["key"]["name"], "ops");
        assert!(created["key"].get("tenant_id").is_none(), "{created}");
        let listed = tenant(&["admin", "key", "list", "--json"]);
        assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
        assert!(!listed.to_string().contains(secret));
        let id = created["key"]["id"].as_str().unwrap();
        let revoked = tenant(&["admin", "key", "revoke", id, "--json"]);
        assert_eq!(revoked["state"], "revoked");
    })
    .await
    .unwrap();
}

/// A `confab serve` child process on a free port.
pub(crate) struct Served {
    pub child: std::process::Child,
    pub base: String,
    pub banner: String,
}

/// Starts `confab serve` with the tiny model (written into `dir`) and returns once it is
/// listening and `/readyz` says ready.
pub(crate) async fn serve(url: &str, key: &str, dir: &std::path::Path) -> Served {
    serve_with(url, key, dir, &[]).await
}

pub(crate) async fn serve_with(
    url: &str,
    key: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> Served {
    let model = crate::tiny::write(dir, "llama");
    // The log goes to `dir/confab.log` (appended across restarts).
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("confab.log"))
        .expect("log file");
    let mut child = Command::new(BIN)
        .args(["serve", "--bind", "127.0.0.1:0", "--model"])
        .arg(&model)
        .env("CONFAB_LOG", "warn")
        .envs(env.iter().copied())
        .env("DATABASE_URL", url)
        .env("CONFAB_BOOTSTRAP_API_KEY", key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let (base, banner) = tokio::task::spawn_blocking(move || {
        let mut banner = String::new();
        for line in BufReader::new(stdout).lines().take(50) {
            let line = line.expect("line");
            banner.push_str(&line);
            banner.push('\n');
            if let Some(rest) = line.strip_prefix("confab listening on ") {
                let base = rest.split_whitespace().next().unwrap().to_string();
                return (base, banner);
            }
        }
        panic!("no listening line in: {banner}");
    })
    .await
    .unwrap();
    Served {
        child,
        base,
        banner,
    }
}

/// Sends SIGTERM and waits (bounded) for a clean exit: the server's shutdown grace (10 s by
/// default, `CONFAB_SHUTDOWN_GRACE_SECS`) for accepted replies, plus 10 s. A bound of the
/// grace alone failed twice on loaded 2-core CI machines (2026-12-07), in cluster tests whose
/// replicas were still finishing replies when stopped.
pub(crate) async fn stop(mut child: std::process::Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..400 {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill().ok();
        panic!("server did not stop within 20 s of SIGTERM (its grace is 10 s)");
    })
    .await
    .unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

async fn serve_bootstraps_and_stops(b: Backend) {
    let (_store, url, _guard) = fresh_store(b).await;
    let key = "ci-known-key-0123456789abcdef";
    let admin = "cfa_ci-known-admin-key-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let Served {
        child,
        base,
        banner,
    } = serve_with(
        &url,
        key,
        dir.path(),
        &[("CONFAB_BOOTSTRAP_ADMIN_KEY", admin)],
    )
    .await;
    assert!(banner.contains("created tenant \"default\""), "{banner}");
    assert!(banner.contains("/docs"), "{banner}");
    assert!(!banner.contains(key), "a chosen key is not echoed");

    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/api/v1/chats/"))
        .header("X-API-Key", key)
        .json(&json!({"user_id": "u"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);

    // The bootstrap admin key works on the admin API, and the command line says what the
    // API says (the key's last use is recorded just after its lookup: polled, bounded).
    let api = |path: &str| {
        let req = http.get(format!("{base}{path}")).header("X-API-Key", admin);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let cli = |args: &[&str]| {
        let (ok, out, err) = confab(&url, args);
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(out.trim()).unwrap()
    };
    let shown = api("/admin/v1/tenants/default").await;
    assert_eq!(cli(&["tenant", "show", "default", "--json"]), shown);
    assert_eq!(
        cli(&["tenant", "list", "--json"]),
        api("/admin/v1/tenants").await
    );
    let mut same = false;
    for _ in 0..40 {
        let over_api = api("/admin/v1/tenants/default/keys").await;
        if cli(&["key", "list", "default", "--json"]) == over_api {
            same = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(same, "key lists differ between the CLI and the API");
    let admins = cli(&["admin", "key", "list", "--json"]);
    assert_eq!(admins["keys"][0]["prefix"], &admin[..12]);
    for group in ["tenant", "user", "key", "day"] {
        assert_eq!(
            cli(&["admin", "usage", "--group-by", group, "--json"]),
            api(&format!("/admin/v1/usage?group_by={group}")).await,
            "{group}"
        );
    }
    // The audit log: the bootstrap's records (by the server), a command's (by its user).
    let (ok, _, err) = confab(&url, &["tenant", "create", "second"]);
    assert!(ok, "{err}");
    let log = api("/admin/v1/audit").await;
    assert_eq!(cli(&["admin", "audit", "--json"]), log);
    let seen: Vec<(&str, &str)> = log["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["actor"]["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("tenant.create", "cli"),
            ("admin_key.create", "server"),
            ("tenant.create", "server")
        ],
        "{log}"
    );
    assert_eq!(
        cli(&["admin", "audit", "--tenant", "default", "--action", "tenant", "--json"]),
        api("/admin/v1/audit?tenant=default&action=tenant").await
    );

    stop(child).await;

    // A second start finds the tenant and does not bootstrap again; nor the admin key,
    // which works already.
    let Served { child, .. } = serve_with(
        &url,
        key,
        dir.path(),
        &[(
            "CONFAB_BOOTSTRAP_ADMIN_KEY",
            "cfa_another-admin-key-0123456789",
        )],
    )
    .await;
    stop(child).await;
    let list = cli(&["tenant", "list", "--json"]);
    let names: Vec<&str> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "second"], "no second bootstrap");
    let admins = cli(&["admin", "key", "list", "--json"]);
    assert_eq!(admins["keys"].as_array().unwrap().len(), 1);
}

/// The README's curl examples, run as written against a live server.
async fn readme_curl_examples_work(b: Backend) {
    let readme = include_str!("../../README.md");
    let after = readme
        .split("<!-- curl-examples -->")
        .nth(1)
        .expect("marker in README");
    let script = after
        .split("```bash")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("bash block");
    let (_store, url, _guard) = fresh_store(b).await;
    let key = "readme-key-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let Served { child, base, .. } = serve(&url, key, dir.path()).await;
    let script = script.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("CONFAB", &base)
            .env("KEY", key)
            .stdin(Stdio::null())
            .output()
            .expect("bash")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "README examples failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("chat: "), "{stdout}");
    assert!(
        stdout.contains("\"title\":\"Billing (resolved)\""),
        "{stdout}"
    );
    assert!(stdout.contains("204"), "{stdout}");
    assert!(stdout.contains("\"status\":\"ready\""), "{stdout}");
    stop(child).await;
}

#[test]
fn serve_refuses_a_missing_or_unsupported_model() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("db.sqlite").display()
    );
    let (ok, _, err) = confab(
        &url,
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--model",
            "/nonexistent/model.gguf",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("models/fetch"),
        "{err}"
    );
    let mamba = crate::tiny::write(dir.path(), "mamba");
    let (ok, _, err) = confab(
        &url,
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--model",
            mamba.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("\"mamba\" is not supported"), "{err}");
    let out = Command::new(BIN)
        .args(["serve", "--model", "hf:owner/repo/file.gguf"])
        .env("DATABASE_URL", &url)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "offline hub reference must fail");
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("--model"),
        "says how to supply the file: {err}"
    );
}

#[test]
fn openapi_command_prints_the_committed_spec() {
    let out = Command::new(BIN).arg("openapi").output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim_end(),
        include_str!("../../openapi/openapi.json").trim_end()
    );
}

/// Polls `/readyz` until the model is loaded (bounded).
pub(crate) async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} did not become ready");
}

/// kill -9 while a reply streams; the next start marks it `interrupted`, keeping the text
/// saved so far, and serves again.
async fn a_kill_during_a_reply_leaves_it_interrupted(b: Backend) {
    let (_store, url, _guard) = fresh_store(b).await;
    let key = "ci-known-key-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("CONFAB_DEBUG_TOKEN_INTERVAL_MS", "20"),
        ("CONFAB_SAVE_INTERVAL_MS", "50"),
        ("CONFAB_LOG", "debug"),
        ("CONFAB_LOG_FORMAT", "json"),
    ];
    let Served {
        mut child, base, ..
    } = serve_with(&url, key, dir.path(), &env).await;
    wait_ready(&base).await;
    let http = reqwest::Client::new();
    let (chat_id, ws, streamed) = reply_under_way(&base, key, 15).await;
    child.kill().unwrap();
    child.wait().unwrap();
    drop(ws);

    let Served { child, base, .. } = serve_with(&url, key, dir.path(), &env).await;
    let (status, page) = {
        let r = http
            .get(format!("{base}/api/v1/chats/{chat_id}/messages"))
            .header("X-API-Key", key)
            .header("X-Request-ID", "req-check-42")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-request-id"], "req-check-42");
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status.as_u16(), 200, "serves again: {page}");
    let chat: Value = http
        .get(format!("{base}/api/v1/chats/{chat_id}"))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{page}");
    assert_eq!(msgs[0]["content"], "Hi");
    assert_eq!(msgs[1]["status"], "interrupted", "{page}");
    let saved = msgs[1]["content"].as_str().unwrap();
    assert!(!saved.is_empty(), "partial text kept");
    assert!(
        streamed.starts_with(saved) || saved.starts_with(&streamed),
        "saved {saved:?} vs streamed {streamed:?}"
    );
    stop(child).await;
    // The key was in the WebSocket URL's query string; no log line shows it.
    let log = std::fs::read_to_string(dir.path().join("confab.log")).unwrap();
    assert!(log.contains("/ws/chat"), "the upgrade is logged: {log}");
    assert!(!log.contains(key), "the API key leaked into the log");
    // JSON lines; the access line of the request carries its id and the tenant's.
    let tenant = chat["tenant_id"].as_str().unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("req-check-42") && l.contains("confab::access"))
        .unwrap_or_else(|| panic!("no access line with the request id: {log}"));
    let v: Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["span"]["request_id"], "req-check-42", "{line}");
    assert_eq!(v["span"]["tenant_id"], tenant, "{line}");
}

/// kill -9 while replies stream (two running in one batch, two queued) and REST writes run:
/// after a restart every acknowledged write is there, no row is left half-done
/// (`streaming`), and the running replies are `interrupted` with their text.
async fn a_kill_under_load_loses_nothing_acknowledged(b: Backend) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (_store, url, _guard) = fresh_store(b).await;
    let key = "ci-known-key-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("CONFAB_DEBUG_TOKEN_INTERVAL_MS", "10"),
        ("CONFAB_SAVE_INTERVAL_MS", "50"),
        ("CONFAB_REQUESTS_PER_MINUTE", "100000"),
        // Four slots, half of them for one tenant: two replies run, two wait.
        ("CONFAB_MAX_BATCH", "4"),
        ("CONFAB_TENANT_SLOT_SHARE", "0.5"),
    ];
    let Served {
        mut child, base, ..
    } = serve_with(&url, key, dir.path(), &env).await;
    wait_ready(&base).await;
    let http = reqwest::Client::new();
    let create =
        {
            let (http, base) = (http.clone(), base.clone());
            move |user: &'static str| {
                let http = http.clone();
                let base = base.clone();
                async move {
                    let r = http
                .post(format!("{base}/api/v1/chats/"))
                .header("X-API-Key", key)
                .json(&json!({"user_id": user, "config": {"temperature": 0, "max_tokens": 200}}))
                .send()
                .await
                .ok()?;
                    if r.status().as_u16() != 201 {
                        return None;
                    }
                    let v: Value = r.json().await.ok()?;
                    Some(v["id"].as_str()?.to_string())
                }
            }
        };
    // Four chats, a message in each: two replies run, two wait.
    let mut sockets = Vec::new();
    let mut acked = Vec::new();
    for _ in 0..4 {
        let chat = create("u").await.expect("chat");
        let mut ws = socket_with_message(&base, key, &chat, "go").await;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .expect("in time")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = frame {
                let e: Value = serde_json::from_str(&t).unwrap();
                if e["event_type"] == "message_received" {
                    acked.push((chat.clone(), e["message_id"].as_str().unwrap().to_string()));
                    break;
                }
            }
        }
        sockets.push(ws);
    }
    // REST writes keep coming while the process dies.
    let create2 = create.clone();
    let writer = tokio::spawn(async move {
        let create = create2;
        let mut created = Vec::new();
        for _ in 0..10_000 {
            match create("w").await {
                Some(id) => created.push(id),
                None => break,
            }
        }
        created
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let created = tokio::time::timeout(Duration::from_secs(20), writer)
        .await
        .expect("writer stops")
        .unwrap();
    assert!(!created.is_empty(), "REST writes ran");
    drop(sockets);

    let Served { child, base, .. } = serve_with(&url, key, dir.path(), &env).await;
    let get = |path: String| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let r = http
                .get(format!("{base}{path}"))
                .header("X-API-Key", key)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    for id in &created {
        let (st, v) = get(format!("/api/v1/chats/{id}")).await;
        assert_eq!(st, 200, "acknowledged chat {id} lost: {v}");
    }
    let mut interrupted = 0;
    for (chat, user_msg) in &acked {
        let (st, v) = get(format!("/api/v1/chats/{chat}/messages?limit=200")).await;
        assert_eq!(st, 200, "{v}");
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(
            msgs[0]["id"],
            user_msg.as_str(),
            "acknowledged message kept"
        );
        let (_, c) = get(format!("/api/v1/chats/{chat}")).await;
        assert_eq!(c["message_count"], msgs.len(), "counter matches the rows");
        for m in msgs {
            assert_ne!(m["status"], "streaming", "half-done row: {m}");
            if m["status"] == "interrupted" {
                interrupted += 1;
                assert!(!m["content"].as_str().unwrap().is_empty(), "{m}");
            }
        }
    }
    assert_eq!(interrupted, 2, "the running replies");
    stop(child).await;
}

crate::backend_tests!(
    a_kill_under_load_loses_nothing_acknowledged,
    a_kill_during_a_reply_leaves_it_interrupted,
    admin_commands,
    serve_bootstraps_and_stops,
    readme_curl_examples_work
);

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A socket on user `u`'s chat, with `content` sent as a message.
pub(crate) async fn socket_with_message(
    base: &str,
    key: &str,
    chat_id: &str,
    content: &str,
) -> Socket {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let ws_url = format!(
        "{}/ws/chat?api_key={key}&user_id=u&chat_id={chat_id}",
        base.replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws.send(Message::text(json!({"content": content}).to_string()))
        .await
        .unwrap();
    ws
}

/// Creates a chat on `base`, sends a message over a socket and returns once `tokens` of
/// the reply have streamed: the chat, the socket and the text so far.
pub(crate) async fn reply_under_way(
    base: &str,
    key: &str,
    tokens: usize,
) -> (String, Socket, String) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let chat = new_chat(base, key, 300).await;
    let mut ws = socket_with_message(base, key, &chat, "Hi").await;
    let mut streamed = String::new();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen < tokens {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("tokens in time")
            .expect("open")
            .unwrap();
        if let Message::Text(t) = frame {
            let e: Value = serde_json::from_str(&t).unwrap();
            if e["event_type"] == "message_stream_token" {
                streamed.push_str(e["token"].as_str().unwrap());
                seen += 1;
            }
        }
    }
    (chat, ws, streamed)
}

/// Creates a chat of user `u` on `base` (greedy, `max_tokens`) and returns its id.
pub(crate) async fn new_chat(base: &str, key: &str, max_tokens: u32) -> String {
    let chat: Value = reqwest::Client::new()
        .post(format!("{base}/api/v1/chats/"))
        .header("X-API-Key", key)
        .json(&json!({"user_id": "u", "config": {"temperature": 0, "max_tokens": max_tokens}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    chat["id"].as_str().unwrap().to_string()
}

/// A chat's stored messages (up to 100), asked of `base`.
pub(crate) async fn messages(base: &str, key: &str, chat_id: &str) -> Vec<Value> {
    let page: Value = reqwest::Client::new()
        .get(format!("{base}/api/v1/chats/{chat_id}/messages?limit=100"))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["messages"].as_array().unwrap().clone()
}

/// The chat's reply as stored, asked of `base`.
pub(crate) async fn stored_reply(base: &str, key: &str, chat_id: &str) -> Value {
    messages(base, key, chat_id).await[1].clone()
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// 500 connections that never send a request and 200 that declare a megabyte body to a
/// public path and trickle it: none of them can make the release binary hold memory, and
/// all are gone within the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_slow_bodies_cannot_pin_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_store, url, _guard) = fresh_store(Backend::Sqlite).await;
    let key = "ci-known-key-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("CONFAB_HEADER_READ_TIMEOUT_SECS", "2"),
        ("CONFAB_MAX_CONNECTIONS_PER_IP", "1000"),
    ];
    let Served { child, base, .. } = serve_with(&url, key, dir.path(), &env).await;
    wait_ready(&base).await;
    let pid = child.id();
    let addr = base.trim_start_matches("http://").to_string();
    let before = rss_kib(pid);
    let started = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut slow = Vec::new();
    for _ in 0..200 {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n";
            if c.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b' '; 16 * 1024];
            // 16 KiB every 50 ms until the server hangs up (bounded: at most 64 chunks).
            for _ in 0..64 {
                if c.write_all(&chunk).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    let mut peak = before;
    for _ in 0..20 {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in slow {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("slow bodies end")
            .unwrap();
    }
    // Every idle connection is closed by the server within the header timeout (plus slack).
    for c in &mut idle {
        let mut buf = [0u8; 64];
        let left = Duration::from_secs(8).saturating_sub(started.elapsed());
        let r = tokio::time::timeout(left.max(Duration::from_millis(1)), c.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection is still open after {:?}",
            started.elapsed()
        );
    }
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib(pid);
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB under 700 idle or slow connections"
    );
    assert!(
        after < before + 32 * 1024,
        "RSS {after} KiB after they closed (was {before} KiB)"
    );
    // The server still serves.
    let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    stop(child).await;
}

/// `confab tokenize` on llama.cpp's vocab-only files (`models/fetch-llama-cpp`): the ids
/// Hugging Face's tokenizer gives, BOS only when asked, pieces with `--show`, and a clear
/// error for a vocabulary type it cannot read.
#[test]
fn tokenize_command() {
    let vocab = |name: &str| {
        format!(
            "{}/models/llama.cpp/models/ggml-vocab-{name}.gguf",
            env!("CARGO_MANIFEST_DIR")
        )
    };
    let run = crate::common::run_confab;
    // One run on Llama 3's vocabulary (128K tokens: the heaviest to build, and this test runs
    // beside timing-sensitive ones), the rest on Phi-3's.
    let (ok, out, err) = run(&["tokenize", "--model", &vocab("llama-bpe")], "Hello world");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "[9906,1917]");
    let (ok, out, err) = run(
        &["tokenize", "--model", &vocab("phi-3"), "--show", "--bos"],
        "Hello world",
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v,
        json!([
            {"id": 1, "piece": "<s>"},
            {"id": 15043, "piece": " Hello"},
            {"id": 3186, "piece": " world"}
        ])
    );
    let (ok, _, err) = run(&["tokenize", "--model", &vocab("bert-bge")], "x");
    assert!(!ok);
    assert!(
        err.contains("\"bert\"") && err.contains("gpt2, llama"),
        "{err}"
    );
}
