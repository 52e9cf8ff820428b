//! confab: a self-hosted, multi-tenant chat server that runs its language model in-process.
//!
//! Module map:
//! - [`config`]: the command line (clap), every flag with an environment variable.
//! - [`cli`]: what each subcommand does (serve, tenant and key admin, openapi).
//! - [`admin`]: the operator's actions (tenants, keys), shared by `/admin/v1` and the CLI.
//! - [`api`]: the HTTP layer (poem-openapi handlers, DTOs, auth, the error/limit middleware).
//! - [`error`]: the API error enum, its stable codes and its one mapping to HTTP.
//! - [`domain`]: typed chats, messages, settings, paging and input rules.
//! - [`store`]: sea-orm persistence (SQLite or PostgreSQL); every tenant query is scoped.
//! - [`credentials`]: API key generation and hashing.
//! - [`engine`]: the in-process model: GGUF loading, tokenizer, chat template, sampling, the
//!   engine thread and its handle.
//! - [`chat`]: live chat over WebSocket: rooms, per-tenant queues, streamed and saved replies.
//! - [`ratelimit`]: token buckets.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`).
//! - [`server`]: the connection layer: accept loop, connection caps, header and write-stall
//!   timeouts (hyper's HTTP/1 under poem's endpoints).
//!
//! [`run`] serves the application on a listener until a shutdown future completes: the binary
//! passes Ctrl-C/SIGTERM, tests pass a oneshot and bind `127.0.0.1:0`.

pub mod admin;
pub mod api;
pub mod audit;
pub mod chat;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod domain;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod ratelimit;
pub mod serve_bench;
pub mod server;
pub mod store;
pub mod web;

use std::future::Future;
use std::time::Duration;

use crate::api::{AppState, Authenticator};
use crate::domain::Limits;
use crate::store::Store;

/// Settings of a running server that are not about storage.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub limits: Limits,
    /// How long a key lookup is cached (bounds how long a revoked key keeps working).
    pub auth_cache_ttl: Duration,
    pub chat: chat::ChatSettings,
    /// The per-tenant limits of tenants that have none of their own (REST rate, WebSocket
    /// message rate, open connections).
    pub quotas: api::quota::QuotaDefaults,
    /// Browser origins allowed to call the API (CORS); empty: CORS off.
    pub cors_origins: Vec<String>,
    /// When set, `/metrics` needs `Authorization: Bearer <token>`.
    pub metrics_token: Option<String>,
    /// Without a metrics token: whether `/metrics` is served to anyone (the binary opens it
    /// only on a loopback address unless `--metrics-public`).
    pub metrics_open: bool,
    /// Caps and timeouts of client connections.
    pub connections: server::ConnectionLimits,
    /// Cluster mode: this server is one replica of several on the same PostgreSQL database.
    pub cluster: Option<cluster::ClusterSettings>,
    /// How the audit log is kept.
    pub audit: audit::AuditSettings,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            limits: Limits::default(),
            auth_cache_ttl: Duration::from_secs(5),
            chat: chat::ChatSettings::default(),
            quotas: api::quota::QuotaDefaults::default(),
            cors_origins: Vec::new(),
            metrics_token: None,
            metrics_open: true,
            connections: server::ConnectionLimits::default(),
            cluster: None,
            audit: audit::AuditSettings::default(),
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes. Then: no new connections or
/// messages, running replies get `chat.shutdown_grace` to finish (the rest are saved as
/// `interrupted`), sockets are closed with 1001, and open requests drain.
///
/// First, replies left `streaming` by a previous process that died are marked `interrupted`
/// (in a cluster, only this replica's: see [`cluster`]).
pub async fn run(
    store: Store,
    model: engine::ModelSlot,
    settings: ServerSettings,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    // Alone on the database, every unfinished reply is this server's; in a cluster only the
    // ones this replica was generating are (the others' may be live).
    let (store, cluster) = match settings.cluster {
        None => (store, None),
        Some(c) => {
            let cluster = cluster::Cluster::join(c)
                .await
                .map_err(std::io::Error::other)?;
            (store.for_replica(cluster.replica_id()), Some(cluster))
        }
    };
    let interrupted = match &cluster {
        None => store.interrupt_streaming().await,
        Some(c) => store.interrupt_streaming_of(c.replica_id()).await,
    }
    .map_err(|e| std::io::Error::other(format!("cannot recover unfinished replies: {e}")))?;
    if interrupted > 0 {
        tracing::warn!(
            replies = interrupted,
            "replies cut off by the last stop marked interrupted"
        );
    }
    let auth = Authenticator::new(store.clone(), settings.auth_cache_ttl, 100_000);
    let quotas = api::quota::Quotas::new(
        store.clone(),
        settings.quotas,
        settings.auth_cache_ttl,
        cluster.clone(),
    );
    let grace = settings.chat.shutdown_grace;
    let audit = audit::Audit::start(store.clone(), settings.audit);
    let chat = chat::ChatService::new(
        store.clone(),
        model.clone(),
        settings.chat,
        cluster.clone(),
        audit.clone(),
    );
    // The lease is held until the running replies have finished (or been interrupted).
    let (leave, left) = tokio::sync::watch::channel(false);
    let membership = cluster
        .clone()
        .map(|c| tokio::spawn(c.run(store.clone(), left)));
    let admin = admin::Admin::live(store.clone(), chat.clone(), auth.clone(), quotas.clone());
    let state = AppState {
        store,
        admin,
        audit: audit.clone(),
        auth,
        limits: settings.limits,
        model,
        chat: chat.clone(),
        quotas,
        cors_origins: settings.cors_origins,
        metrics_token: settings.metrics_token,
        metrics_open: settings.metrics_open,
        connections: settings.connections,
        cluster,
    };
    let app = api::app(state);
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing running replies");
        chat.shutdown().await;
        audit.flush().await;
        let _ = leave.send(true);
        if let Some(m) = membership {
            let _ = m.await;
        }
    };
    server::serve(
        listener,
        app,
        settings.connections,
        shutdown,
        grace + Duration::from_secs(10),
    )
    .await
}
