//! What each subcommand does (the operator's commands in [`admin`]). Admin commands talk to the database directly, so they work
//! while the server is stopped (and while it runs: SQLite WAL and PostgreSQL both allow it).

use std::time::Duration;

use anyhow::Context;

use crate::config::{BenchArgs, Cli, Command, DbArgs, ServeArgs};
use crate::credentials;
use crate::domain::{Actor, AuditAction};
use crate::engine::source::ModelSource;
use crate::engine::{ModelSlot, ModelStatus};
use crate::store::{redact_url, AuditRecord, Backend, KeySpec, Store, StoreError, StoreOptions};
use crate::ServerSettings;

mod admin;

/// Runs the parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Openapi => {
            println!("{}", crate::api::openapi_json());
            Ok(())
        }
        Command::Serve(args) => serve(&cli.db, *args).await,
        Command::Tenant(cmd) => admin::tenant(&offline(&cli.db).await?, cmd).await,
        Command::Key(cmd) => admin::key(&offline(&cli.db).await?, cmd).await,
        Command::Admin(cmd) => admin::admin(&offline(&cli.db).await?, cmd).await,
        Command::Bench(args) => bench(args).await,
        Command::Tokenize(args) => tokenize(args),
        Command::Run(args) => run(args).await,
    }
}

/// `confab tokenize`: the model's tokenizer on stdin, as `llama-tokenize` does. Special-token
/// text (`<|eot_id|>`) becomes the special token, as in a chat template.
fn tokenize(args: crate::config::TokenizeArgs) -> anyhow::Result<()> {
    use std::io::Read;
    let tokenizer = crate::engine::tokenizer::TextTokenizer::from_file(&args.model)?;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read stdin as UTF-8 text")?;
    let ids = tokenizer.tokenize(&text, args.bos)?;
    let out = if args.show {
        serde_json::Value::Array(
            ids.iter()
                .map(|&id| serde_json::json!({"id": id, "piece": tokenizer.piece(id)}))
                .collect(),
        )
    } else {
        serde_json::json!(ids)
    };
    println!("{out}");
    Ok(())
}

/// `confab run`: a terminal chat through the engine (the same path as the server's
/// replies), or with `--raw` a plain completion.
async fn run(args: crate::config::RunArgs) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};

    use crate::engine::{ChatMessage, GenerateRequest, GenerationEvent, SamplingParams};
    let path = ModelSource::parse(&args.model.model)?.resolve()?;
    let opts = args.model.engine_options();
    let sampling = if args.greedy {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: args.temperature,
            seed: args.seed,
            ..SamplingParams::default()
        }
    };
    if args.raw {
        let prompt = args.prompt.unwrap_or_default();
        let max_tokens = args.max_tokens;
        return tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let engine = crate::engine::LoadedEngine::open(&path, &opts)?;
            let mut out = std::io::stdout().lock();
            crate::engine::complete::complete(&engine, &prompt, sampling, max_tokens, |piece| {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            })?;
            let _ = writeln!(out);
            Ok(())
        })
        .await?;
    }
    let engine = tokio::task::spawn_blocking(move || crate::engine::load(path, opts)).await??;
    let interactive = args.prompt.is_none() && std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "{} ({}, {}) — one message per line; end with Ctrl-D.",
            engine.info.name, engine.info.architecture, engine.info.quantization
        );
    }
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(ChatMessage::new(crate::domain::Role::System, system));
    }
    let chat = uuid::Uuid::new_v4();
    let mut lines = std::io::stdin().lock().lines();
    // `--prompt`: that one turn; else one turn per line of stdin.
    let single = args.prompt.is_some();
    let mut once = args.prompt;
    loop {
        let text = match once.take() {
            Some(t) => t,
            None if single => break,
            None => {
                if interactive {
                    eprint!("> ");
                }
                match lines.next() {
                    Some(line) => line.context("cannot read stdin")?,
                    None => break,
                }
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::new(crate::domain::Role::User, text));
        let mut generation = engine
            .generate(GenerateRequest {
                messages: messages.clone(),
                sampling: sampling.clone(),
                max_tokens: args.max_tokens,
                stop: Vec::new(),
                cache_key: Some(chat),
                grammar: None,
                tools: None,
                logprobs: None,
                raw_prompt: None,
            })
            .await?;
        let mut stdout = std::io::stdout();
        let mut reply = String::new();
        while let Some(event) = generation.events.recv().await {
            match event {
                GenerationEvent::Delta { text, .. } => {
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                    reply.push_str(&text);
                }
                GenerationEvent::Finished(summary) => {
                    if let Some(e) = summary.error {
                        anyhow::bail!("the reply failed: {e}");
                    }
                }
                GenerationEvent::Started { .. } => {}
            }
        }
        writeln!(stdout)?;
        messages.push(ChatMessage::new(crate::domain::Role::Assistant, reply));
    }
    Ok(())
}

/// The operator's actions on the database (no running server is needed).
async fn offline(db: &DbArgs) -> anyhow::Result<crate::admin::Admin> {
    Ok(crate::admin::Admin::offline(open(db).await?))
}

/// Opens (and migrates) the database, creating the data directory for SQLite.
pub async fn open(db: &DbArgs) -> anyhow::Result<Store> {
    let url = db.url();
    if db.database_url.is_none() {
        std::fs::create_dir_all(&db.data_dir)
            .with_context(|| format!("cannot create data directory {}", db.data_dir.display()))?;
    }
    let opts = StoreOptions {
        max_connections: db.db_max_connections.max(1),
        acquire_timeout: Duration::from_secs(db.db_acquire_timeout_secs.max(1)),
    };
    Store::connect(&url, &opts)
        .await
        .with_context(|| format!("cannot open database {}", redact_url(&url)))
}

/// Resolves the model file and checks its header now, so a missing file or an unsupported
/// architecture stops start-up with a clear message; the weights load in the background
/// while the server already answers (`/readyz` says when the model is ready).
fn start_model(args: &crate::config::ModelArgs) -> anyhow::Result<ModelSlot> {
    let path = ModelSource::parse(&args.model)?.resolve()?;
    crate::engine::gguf::GgufFile::open(&path)?;
    let slot = ModelSlot::new(ModelStatus::Loading);
    let opts = args.engine_options();
    let background = slot.clone();
    std::thread::Builder::new()
        .name("confab-model-load".into())
        .spawn(move || match crate::engine::load(path.clone(), opts) {
            Ok(handle) => {
                tracing::info!(
                    model = %handle.info.name,
                    path = %path.display(),
                    architecture = %handle.info.architecture,
                    quantization = %handle.info.quantization,
                    parameters = handle.info.parameters,
                    context = handle.info.context_length,
                    load_ms = handle.info.load_time.as_millis() as u64,
                    "model loaded"
                );
                crate::metrics::metrics()
                    .model_load_seconds
                    .set(handle.info.load_time.as_secs_f64());
                background.set(ModelStatus::Ready(handle));
            }
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "model failed to load");
                background.set(ModelStatus::Failed(e.to_string()));
            }
        })?;
    Ok(slot)
}

async fn serve(db: &DbArgs, args: ServeArgs) -> anyhow::Result<()> {
    let cluster = args.cluster.settings();
    if cluster.is_some() && Backend::of_url(&db.url()) != Some(Backend::Postgres) {
        anyhow::bail!(
            "cluster mode (--redis-url) needs PostgreSQL: replicas share one database, and a \
             SQLite file belongs to one process. Set DATABASE_URL=postgres://…, or drop \
             --redis-url to run one server."
        );
    }
    let model = start_model(&args.model)?;
    let store = open(db).await?;
    tracing::info!(database = %redact_url(&db.url()), "database ready");
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("cannot listen on {}", args.bind))?;
    let addr = listener.local_addr()?;
    bootstrap(&store, &args, addr).await?;
    bootstrap_admin(&store, &args).await?;
    tracing::info!(%addr, "listening");
    // Before the line that tells a supervisor (or a test) the server is up: a SIGTERM
    // right after it must stop the server gracefully, not kill it.
    let shutdown = shutdown_signal();
    println!("confab listening on http://{addr}  (Swagger UI: http://{addr}/docs)");
    let auth_cache_ttl = Duration::from_secs(args.auth_cache_ttl_secs);
    let settings = ServerSettings {
        limits: (&args.limits).into(),
        auth_cache_ttl,
        chat: crate::chat::ChatSettings {
            // Budgets are cached as long as keys and limits.
            budget_refresh: auth_cache_ttl,
            ..args.chat.settings((&args.limits).into())
        },
        quotas: crate::api::quota::QuotaDefaults {
            requests_per_minute: args.requests_per_minute.max(1),
            ws_messages_per_second: args.chat.ws_messages_per_second,
            max_connections: args.chat.max_connections_per_tenant,
        },
        cors_origins: args
            .cors_origins
            .iter()
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect(),
        metrics_token: args.metrics_token.as_ref().map(|t| t.0.clone()),
        metrics_open: addr.ip().is_loopback() || args.metrics_public,
        connections: (&args.connections).into(),
        cluster,
        audit: (&args.audit).into(),
    };
    crate::run(store.clone(), model, settings, listener, shutdown).await?;
    store.close().await.ok();
    tracing::info!("stopped");
    Ok(())
}

/// First start: with no tenant at all, create `default` and print its key once.
async fn bootstrap(
    store: &Store,
    args: &ServeArgs,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    if store.tenant_count().await? > 0 {
        return Ok(());
    }
    let key = match &args.bootstrap_api_key {
        Some(k) => credentials::custom(&k.0)
            .map_err(|e| anyhow::anyhow!("CONFAB_BOOTSTRAP_API_KEY: {e}"))?,
        None => credentials::generate(),
    };
    let (t, _) = match store.create_tenant("default", &key).await {
        Ok(created) => created,
        // Another process bootstrapped at the same moment.
        Err(StoreError::Conflict(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    store
        .append_audit(vec![AuditRecord::new(
            AuditAction::TenantCreate,
            Actor::Server,
        )
        .tenant(t.id, &t.name)
        .detail("bootstrap", true)])
        .await?;
    let base = format!("http://{addr}");
    println!();
    println!("  First start: created tenant \"default\" ({}).", t.id);
    if args.bootstrap_api_key.is_some() {
        println!("  Its API key is the one given in CONFAB_BOOTSTRAP_API_KEY.");
    } else {
        println!("  Its API key (shown only this once, keep it safe):");
        println!();
        println!("      {}", key.secret);
    }
    println!();
    println!("  Swagger UI:  {base}/docs   (Authorize with the key)");
    println!("  OpenAPI:     {base}/openapi.json");
    println!();
    Ok(())
}

/// `CONFAB_BOOTSTRAP_ADMIN_KEY`: while no admin key works (none yet, or all revoked or
/// expired), the given one is added, so a fresh deployment can be managed over the API
/// without a shell. Once any admin key works the variable is ignored (and may be removed).
async fn bootstrap_admin(store: &Store, args: &ServeArgs) -> anyhow::Result<()> {
    let Some(secret) = &args.bootstrap_admin_key else {
        return Ok(());
    };
    let key = credentials::custom(&secret.0)
        .map_err(|e| anyhow::anyhow!("CONFAB_BOOTSTRAP_ADMIN_KEY: {e}"))?;
    let now = chrono::Utc::now();
    let working = store
        .list_admin_keys()
        .await?
        .into_iter()
        .any(|k| k.revoked_at.is_none() && k.expires_at.is_none_or(|at| at > now));
    if working {
        tracing::debug!("an admin key works already; CONFAB_BOOTSTRAP_ADMIN_KEY ignored");
        return Ok(());
    }
    let spec = KeySpec {
        name: Some("bootstrap (CONFAB_BOOTSTRAP_ADMIN_KEY)".into()),
        expires_at: None,
    };
    match store.create_admin_key(&key, &spec).await {
        Ok(k) => {
            tracing::info!(prefix = %k.prefix, "admin key from CONFAB_BOOTSTRAP_ADMIN_KEY added");
            store
                .append_audit(vec![AuditRecord::about_key(
                    AuditAction::AdminKeyCreate,
                    Actor::Server,
                    &k,
                )
                .detail("bootstrap", true)])
                .await?;
        }
        // Another replica added it at the same moment (or it was revoked: then it stays so).
        Err(StoreError::Conflict(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed here, when it is called, not at
/// the future's first poll: the accept loop may not poll it before it has handled the
/// connections already waiting, and a SIGTERM in that window killed the process outright
/// instead of shutting it down (seen as a flaky test under load).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (int, term) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(int) => {},
                _ = wait(term) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down");
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(crate::config::BenchTarget::Serve(a)) = args.target {
        let cfg = crate::serve_bench::ServeBenchConfig {
            url: a.url,
            api_key: a.api_key,
            chats: a.chats.max(1),
            turns: a.turns.max(1),
            max_tokens: a.max_tokens.max(1),
            reply_timeout: std::time::Duration::from_secs(a.reply_timeout_secs.max(1)),
            watch_urls: a.watch_urls,
        };
        let report = crate::serve_bench::run(&cfg).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            crate::serve_bench::print(&report);
        }
        return Ok(());
    }
    let path = ModelSource::parse(&args.model.model)?.resolve()?;
    let opts = args.model.engine_options();
    let cfg = crate::engine::bench::BenchConfig {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        reps: args.reps.max(1),
        batches: args.batch.clone(),
    };
    let report = tokio::task::spawn_blocking(move || crate::engine::bench::run(&path, &opts, &cfg))
        .await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let s = |x: &crate::engine::bench::Stat| {
            format!("{:>8.1} (min {:.1}, max {:.1})", x.median, x.min, x.max)
        };
        println!("model   {}  device {}", report.model, report.device);
        println!("load    {:.2} s", report.load_seconds);
        println!(
            "pp{:<5} {} tok/s",
            report.prompt_tokens,
            s(&report.pp_tokens_per_second)
        );
        println!(
            "tg{:<5} {} tok/s",
            report.gen_tokens,
            s(&report.tg_tokens_per_second)
        );
        let tg = report.tg_tokens_per_second.median;
        println!(
            "tg{:<5} {} tok/s  constrained by a JSON Schema ({:.0}% of tg; vocabulary indexed in {:.2} s)",
            report.gen_tokens,
            s(&report.constrained_tg_tokens_per_second),
            100.0 * report.constrained_tg_tokens_per_second.median / tg.max(f64::MIN_POSITIVE),
            report.grammar_index_seconds
        );
        println!(
            "ttft    {} ms  ({}-token prompt)",
            s(&report.time_to_first_token_ms),
            report.prompt_tokens
        );
        for b in &report.batched_tg {
            println!(
                "tg{:<5} {} tok/s  (x{} sequences, all together)",
                report.gen_tokens,
                s(&b.tokens_per_second),
                b.batch
            );
        }
        if let Some(m) = report.peak_rss_mib {
            println!("peak    {m:.0} MiB resident");
        }
        if let Some(w) = report.weights {
            println!(
                "weights {:.0} MiB resident, {:.0}% of it in 2 MiB pages",
                w.resident_mib,
                100.0 * w.huge_page_share
            );
        }
    }
    Ok(())
}
