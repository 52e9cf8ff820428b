//! confab: a self-hosted, multi-tenant chat server that runs its language model in-process.
//!
//! Module map:
//! - [`config`]: the command line (clap), every flag with an environment variable.
//! - [`cli`]: what each subcommand does (serve, tenant and key admin, openapi).
//! - [`api`]: the HTTP layer (poem-openapi handlers, DTOs, auth, the error/limit middleware).
//! - [`error`]: the API error enum, its stable codes and its one mapping to HTTP.
//! - [`domain`]: typed chats, messages, settings, paging and input rules.
//! - [`store`]: sea-orm persistence (SQLite or PostgreSQL); every tenant query is scoped.
//! - [`credentials`]: API key generation and hashing.
//! - [`engine`]: the in-process model: GGUF loading, tokenizer, chat template, sampling, the
//!   engine thread and its handle.
//!
//! [`run`] serves the application on a listener until a shutdown future completes: the binary
//! passes Ctrl-C/SIGTERM, tests pass a oneshot and bind `127.0.0.1:0`.

pub mod api;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod domain;
pub mod engine;
pub mod error;
pub mod store;

use std::future::Future;
use std::time::Duration;

use poem::listener::TcpAcceptor;
use poem::Server;

use crate::api::{AppState, Authenticator};
use crate::domain::Limits;
use crate::store::Store;

/// Settings of a running server that are not about storage.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub limits: Limits,
    /// How long a key lookup is cached (bounds how long a revoked key keeps working).
    pub auth_cache_ttl: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            limits: Limits::default(),
            auth_cache_ttl: Duration::from_secs(5),
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes, then drains open requests
/// (for at most 10 seconds).
pub async fn run(
    store: Store,
    model: engine::ModelSlot,
    settings: ServerSettings,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let auth = Authenticator::new(store.clone(), settings.auth_cache_ttl, 100_000);
    let state = AppState {
        store,
        auth,
        limits: settings.limits,
        model,
    };
    let app = api::app(state);
    Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?)
        .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_secs(10)))
        .await
}
