//! The HTTP layer: poem-openapi operations, thin on purpose. Handlers turn requests into
//! domain values, call the store, and turn results into DTOs; nothing else lives here.

mod admin;
mod anthropic;
mod auth;
/// The `/admin/v1` bodies, which the command line prints too.
pub use admin::dto as admin_dto;
mod chats;
pub mod dto;
mod health;
mod middleware;
mod offered_tools;
pub mod openai;
pub mod quota;
mod stateless;
mod tokens;
mod transfer;
pub mod types;
mod usage;
mod ws;

pub use auth::Authenticator;

use poem::http::Method;
use poem::middleware::{CatchPanic, NormalizePath, TrailingSlash};
use poem::{Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Route, RouteMethod};
use poem_openapi::{OpenApiService, Tags};

use crate::chat::ChatService;
use crate::domain::Limits;
use crate::engine::ModelSlot;
use crate::store::Store;

/// What every handler needs, shared by cheap clones.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The operator's actions (`/admin/v1`), live: they reach sockets and caches.
    pub admin: crate::admin::Admin,
    /// Failed authentications are tallied there.
    pub audit: crate::audit::Audit,
    pub auth: Authenticator,
    pub limits: Limits,
    /// The model's state; handlers that generate need it `Ready`.
    pub model: ModelSlot,
    /// Live chat: rooms, queues, replies.
    pub chat: ChatService,
    /// Per-tenant request rates and WebSocket limits.
    pub quotas: quota::Quotas,
    /// Browser origins allowed to call the API (CORS); empty: CORS off.
    pub cors_origins: Vec<String>,
    /// When set, `/metrics` needs `Authorization: Bearer <token>`.
    pub metrics_token: Option<String>,
    /// Without a token: whether `/metrics` is served (else 403 `metrics_closed`).
    pub metrics_open: bool,
    /// Connection caps and timeouts; the body deadline is applied by the middleware.
    pub connections: crate::server::ConnectionLimits,
    /// This replica's membership of a cluster (`--redis-url`); `None`: one server.
    pub cluster: Option<crate::cluster::Cluster>,
}

#[derive(Tags)]
enum ApiTags {
    /// Operators: tenants and their keys. Needs an admin key (`confab admin key create`),
    /// which no other route takes.
    Admin,
    /// Create and manage chats and read their history.
    Chats,
    /// Liveness and readiness probes.
    Health,
    /// Token usage accounting.
    Usage,
}

type Apis = (
    chats::ChatsApi,
    transfer::TransferApi,
    tokens::TokensApi,
    usage::UsageApi,
    health::HealthApi,
    admin::AdminApi,
);

fn service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            chats::ChatsApi,
            transfer::TransferApi,
            tokens::TokensApi,
            usage::UsageApi,
            health::HealthApi,
            admin::AdminApi,
        ),
        "confab",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Self-hosted multi-tenant chat server with an in-process language model. \
             Every `/api` operation needs the tenant API key in the `X-API-Key` header, \
             every `/admin/v1` operation an admin key there; \
             every error has the shape `{\"error\": {\"code\", \"message\", \"details\"}}`.",
    )
}

/// The OpenAPI document, as served at `/openapi.json` and committed in `openapi/`.
pub fn openapi_json() -> String {
    service().spec()
}

/// The OpenAI- and Anthropic-compatible generation routes: outside the OpenAPI document, so
/// their bodies are declared to the middleware by hand.
const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const MESSAGES: &str = "/v1/messages";
const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

/// The whole HTTP application.
pub fn app(state: AppState) -> impl Endpoint {
    let api = service();
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    let cors = (!state.cors_origins.is_empty()).then(|| {
        poem::middleware::Cors::new()
            .allow_origins(state.cors_origins.iter().map(String::as_str))
            .allow_methods(["GET", "POST", "PATCH", "DELETE"])
            .allow_headers([
                "X-API-Key",
                "Content-Type",
                "Authorization",
                "X-Chat-ID",
                // What Anthropic's SDKs send from a browser.
                "anthropic-version",
                "anthropic-beta",
                "anthropic-dangerous-direct-browser-access",
            ])
            .expose_headers([
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "RateLimit-Policy",
                "RateLimit",
                "Retry-After",
            ])
    });
    // Which replica answered (cluster mode): for operators checking the load balancer's
    // routing, and for the routing tests.
    let replica = state.cluster.as_ref().map(|c| c.replica_id().to_string());
    let around_state = state.clone();
    // The routes outside the OpenAPI document, each with its one method: mounted here and
    // declared to the middleware from the same list (for `Allow` on a 405, and whether a
    // body is read).
    let plain: [(&str, Method, RouteMethod); 18] = [
        ("/", Method::GET, poem::get(crate::web::index)),
        ("/assets/app.js", Method::GET, poem::get(crate::web::app_js)),
        (
            "/assets/app.css",
            Method::GET,
            poem::get(crate::web::app_css),
        ),
        (
            "/assets/common.js",
            Method::GET,
            poem::get(crate::web::common_js),
        ),
        (
            "/assets/markdown.js",
            Method::GET,
            poem::get(crate::web::markdown_js),
        ),
        (
            "/assets/favicon.svg",
            Method::GET,
            poem::get(crate::web::favicon),
        ),
        ("/admin", Method::GET, poem::get(crate::web::admin)),
        (
            "/assets/admin.js",
            Method::GET,
            poem::get(crate::web::admin_js),
        ),
        (
            "/assets/admin.css",
            Method::GET,
            poem::get(crate::web::admin_css),
        ),
        ("/openapi.json", Method::GET, poem::get(spec)),
        ("/ws/chat", Method::GET, poem::get(ws::ws_chat)),
        ("/metrics", Method::GET, poem::get(metrics_text)),
        ("/v1/models", Method::GET, poem::get(openai::models)),
        (
            "/v1/models/:id",
            Method::GET,
            poem::get(openai::model_by_id),
        ),
        (
            CHAT_COMPLETIONS,
            Method::POST,
            poem::post(openai::chat_completions),
        ),
        (COMPLETIONS, Method::POST, poem::post(openai::completions)),
        (MESSAGES, Method::POST, poem::post(anthropic::messages)),
        (
            COUNT_TOKENS,
            Method::POST,
            poem::post(anthropic::count_tokens),
        ),
    ];
    let mut table = middleware::RouteTable::from_spec(&api.spec());
    // The operations live under `/api/` plus the two probes; mounting the service at `/`
    // would shadow the chat page there.
    let operations = std::sync::Arc::new(api.into_endpoint());
    let mut route = Route::new()
        .nest_no_strip("/api", operations.clone())
        .nest_no_strip("/admin/v1", operations.clone())
        .at("/healthz", operations.clone())
        .at("/readyz", operations)
        .nest("/docs", docs);
    for (path, method, endpoint) in plain {
        // poem writes a parameter `:name`, OpenAPI `{name}`.
        let template: Vec<String> = path
            .split('/')
            .map(|seg| match seg.strip_prefix(':') {
                Some(name) => format!("{{{name}}}"),
                None => seg.to_string(),
            })
            .collect();
        table.add(method.clone(), &template.join("/"), method == Method::POST);
        route = route.at(path, endpoint);
    }
    table.add(Method::GET, "/docs/*", false);
    let params = std::sync::Arc::new(table);
    route
        .data(state)
        // `/api/v1/chats/` and `/api/v1/chats` are the same route (the seed documents the
        // former; OpenAPI paths carry no trailing slash).
        .with(NormalizePath::new(TrailingSlash::Trim))
        // A bug that panics in a handler still answers with the one error shape.
        .with(CatchPanic::new().with_handler(|_| {
            tracing::error!("handler panicked");
            poem::IntoResponse::into_response(crate::error::ApiError::Internal)
        }))
        .around(move |ep, req| middleware::around(ep, req, around_state.clone(), params.clone()))
        .with_if(cors.is_some(), cors.unwrap_or_default())
        .with_if(
            replica.is_some(),
            poem::middleware::SetHeader::new()
                .overriding("X-Confab-Replica", replica.unwrap_or_default()),
        )
}

/// `GET /metrics`: Prometheus text format. An operator endpoint (it names tenant ids):
/// with `--metrics-token` it needs that bearer token; without one it is served only when
/// the server listens on a loopback address or `--metrics-public` says so.
#[poem::handler]
fn metrics_text(req: &poem::Request, state: poem::web::Data<&AppState>) -> poem::Response {
    match &state.metrics_token {
        Some(token) => {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            // Compared by hash so the time taken does not depend on how much of it matched.
            let ok = given.is_some_and(|g| {
                crate::credentials::hash_key(g) == crate::credentials::hash_key(token)
            });
            if !ok {
                let mut r = crate::error::ApiError::MetricsUnauthorized.into_response();
                r.headers_mut().insert(
                    "www-authenticate",
                    poem::http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        None if !state.metrics_open => {
            return crate::error::ApiError::MetricsClosed.into_response();
        }
        None => {}
    }
    poem::Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(crate::metrics::metrics().render())
}
