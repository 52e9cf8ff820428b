//! The client-facing error: one enum, one stable `code` per variant, and from each variant
//! everything every transport needs, decided here once: the HTTP status, the WebSocket
//! `error` event and close code, and (in `api::openai`, from the same code, status and
//! message) the OpenAI error body.
//!
//! The layers below have their own errors (`StoreError`, `chat::ChatError`,
//! `EngineError`, the protocol's `FrameError`, `ValidationError`); each converts into this
//! one in a single `From`.
//!
//! Every non-2xx answer of the server, the framework's own rejections included (see
//! `api::middleware`), is this JSON shape:
//! `{"error": {"code": "…", "message": "…", "details": {…}}}`; a WebSocket error event
//! carries the same three fields.
//! Internal failures reach clients as a fixed message; what went wrong goes to the log.

use std::marker::PhantomData;

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::{ApiResponse, Object};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::api::types::JsonObject;
use crate::chat::protocol::{close, Event, FrameError};
use crate::domain::ValidationError;
use crate::engine::EngineError;
use crate::store::StoreError;

/// Whole seconds from now until `at` (at least 1).
fn seconds_until(at: chrono::DateTime<chrono::Utc>) -> u64 {
    let ms = (at - chrono::Utc::now()).num_milliseconds().max(0) as u64;
    ms.div_ceil(1000).max(1)
}

/// The two kinds of key, for telling a client which one a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Tenant,
    Admin,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Tenant => "tenant_key",
            KeyKind::Admin => "admin_key",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            KeyKind::Tenant => "a tenant API key (admin keys work only under /admin/v1)",
            KeyKind::Admin => "an admin key (`confab admin key create`)",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            KeyKind::Tenant => "Use a key of the tenant (`confab key create TENANT`, or POST /admin/v1/tenants/{tenant}/keys).",
            KeyKind::Admin => "Create one with `confab admin key create`, or start the server with CONFAB_BOOTSTRAP_ADMIN_KEY.",
        }
    }
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing API key")]
    MissingApiKey,
    #[error("invalid API key")]
    InvalidApiKey,
    /// The key exists but its expiry has passed.
    #[error("API key expired")]
    ApiKeyExpired {
        expired_at: chrono::DateTime<chrono::Utc>,
    },
    /// The key is of the wrong kind for the route: a tenant key on `/admin/v1`, an admin
    /// key on a tenant route.
    #[error("forbidden")]
    Forbidden { needs: KeyKind },
    /// A user-scoped token used for another user.
    #[error("forbidden")]
    OtherUser { token_user: String },
    /// The tenant was disabled by an operator.
    #[error("tenant disabled")]
    TenantDisabled {
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
    #[error("chat {0} not found")]
    ChatNotFound(Uuid),
    /// A message named in a chat operation (regenerate, edit, switch branch) is not in it.
    /// 400, not 404: the chat the path names exists; the request's reference is wrong.
    #[error("message {0} not found")]
    MessageNotFound(Uuid),
    /// An admin operation named a tenant (by name or id) that does not exist.
    #[error("tenant {0} not found")]
    TenantNotFound(String),
    /// An admin operation named a key (by id or prefix) that does not exist.
    #[error("API key {0} not found")]
    ApiKeyNotFound(String),
    /// A WebSocket frame or connection parameter broke the protocol (boxed: the largest
    /// variant would otherwise set the size of every `Result` that carries this error).
    #[error("{}", .0.message)]
    Protocol(Box<FrameError>),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter { name: String, reason: String },
    #[error("invalid request body: {reason}")]
    InvalidBody { reason: String },
    #[error("request body is not valid JSON: {reason}")]
    InvalidJson {
        reason: String,
        line: usize,
        column: usize,
    },
    #[error("unsupported content type")]
    UnsupportedMediaType { got: Option<String> },
    #[error("request body too large")]
    PayloadTooLarge { limit: usize },
    #[error("request body too slow")]
    RequestTimeout { seconds: u64 },
    #[error("no such route")]
    NotFound { method: String, path: String },
    #[error("method not allowed")]
    MethodNotAllowed {
        method: String,
        path: String,
        /// The methods the path answers (the `Allow` header).
        allowed: Vec<String>,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("rate limited")]
    RateLimited { limit: u32, retry_after_secs: u64 },
    #[error("database unavailable")]
    DatabaseUnavailable,
    #[error("not ready")]
    NotReady(Map<String, Value>),
    #[error("model {model} not found")]
    ModelNotFound {
        model: String,
        available: Vec<String>,
    },
    #[error("the model is not loaded")]
    ModelNotReady,
    #[error("the tenant's queue is full")]
    QueueFull { capacity: usize },
    /// A reply or completion could overrun a token budget (boxed: it is the largest).
    #[error("token budget reached")]
    QuotaExceeded(Box<crate::chat::budget::QuotaExceeded>),
    #[error("the server is overloaded")]
    ServerBusy,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the prompt does not fit the context")]
    ContextLengthExceeded { max_tokens: usize, context: usize },
    /// A chat's message alone needs more tokens than the context holds.
    #[error("the message does not fit the context")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("a reply is already being generated in this chat")]
    GenerationInProgress,
    #[error("no reply to cancel")]
    NothingToCancel,
    #[error("too many connections")]
    TooManyConnections { limit: usize },
    /// A WebSocket connection sent more frames than its rate allows.
    #[error("too many messages")]
    MessageRateLimited {
        per_second: f64,
        burst: u32,
        retry_after_ms: u64,
    },
    /// A socket read the chat's events too slowly and missed some.
    #[error("slow consumer")]
    SlowConsumer { missed: u64 },
    /// A streamed reply's final text could not be saved.
    #[error("reply {message_id} not saved")]
    ReplyNotSaved {
        message_id: Uuid,
        reason: &'static str,
    },
    #[error("generation failed: {0}")]
    GenerationFailed(String),
    #[error("metrics token missing or wrong")]
    MetricsUnauthorized,
    #[error("metrics closed")]
    MetricsClosed,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The stable, snake_case code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MissingApiKey => "missing_api_key",
            ApiError::InvalidApiKey => "invalid_api_key",
            ApiError::ApiKeyExpired { .. } => "api_key_expired",
            ApiError::Forbidden { .. } | ApiError::OtherUser { .. } => "forbidden",
            ApiError::TenantDisabled { .. } => "tenant_disabled",
            ApiError::ChatNotFound(_) => "chat_not_found",
            ApiError::MessageNotFound(_) => "message_not_found",
            ApiError::TenantNotFound(_) => "tenant_not_found",
            ApiError::ApiKeyNotFound(_) => "api_key_not_found",
            ApiError::Protocol(f) => f.code,
            ApiError::Validation(_)
            | ApiError::InvalidParameter { .. }
            | ApiError::InvalidBody { .. } => "validation_error",
            ApiError::InvalidJson { .. } => "invalid_json",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::DatabaseUnavailable => "database_unavailable",
            ApiError::NotReady(_) => "not_ready",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::ModelNotReady => "model_not_ready",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::ServerBusy => "server_busy",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::ContextLengthExceeded { .. } | ApiError::PromptTooLong { .. } => {
                "context_length_exceeded"
            }
            ApiError::GenerationInProgress => "generation_in_progress",
            ApiError::NothingToCancel => "nothing_to_cancel",
            ApiError::TooManyConnections { .. } => "too_many_connections",
            ApiError::MessageRateLimited { .. } => "rate_limited",
            ApiError::SlowConsumer { .. } => "slow_consumer",
            ApiError::ReplyNotSaved { .. } => "reply_not_saved",
            ApiError::GenerationFailed(_) => "generation_failed",
            ApiError::MetricsUnauthorized => "unauthorized",
            ApiError::MetricsClosed => "metrics_closed",
            ApiError::Internal => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingApiKey | ApiError::InvalidApiKey | ApiError::ApiKeyExpired { .. } => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden { .. }
            | ApiError::OtherUser { .. }
            | ApiError::TenantDisabled { .. } => StatusCode::FORBIDDEN,
            ApiError::ChatNotFound(_)
            | ApiError::TenantNotFound(_)
            | ApiError::ApiKeyNotFound(_)
            | ApiError::NotFound { .. }
            | ApiError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::ContextLengthExceeded { .. }
            | ApiError::PromptTooLong { .. }
            | ApiError::MessageNotFound(_) => StatusCode::BAD_REQUEST,
            // The protocol decided the close code; the status is the one it mirrors.
            ApiError::Protocol(f) => match f.close {
                close::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
                close::TOO_BIG => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            },
            ApiError::GenerationInProgress | ApiError::NothingToCancel => StatusCode::CONFLICT,
            ApiError::TooManyConnections { .. }
            | ApiError::MessageRateLimited { .. }
            | ApiError::SlowConsumer { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ReplyNotSaved { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::QueueFull { .. } | ApiError::QuotaExceeded(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::ModelNotReady | ApiError::ServerBusy | ApiError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::GenerationFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Validation(_)
            | ApiError::InvalidParameter { .. }
            | ApiError::InvalidBody { .. }
            | ApiError::InvalidJson { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::DatabaseUnavailable | ApiError::NotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::MetricsUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::MetricsClosed => StatusCode::FORBIDDEN,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A human sentence: what went wrong and, where possible, what to do.
    pub fn message(&self) -> String {
        match self {
            ApiError::MissingApiKey => {
                "This endpoint needs an API key in the X-API-Key header.".into()
            }
            ApiError::InvalidApiKey => "The API key is not valid or has been revoked.".into(),
            ApiError::ApiKeyExpired { expired_at } => {
                format!("The API key expired at {}.", expired_at.to_rfc3339())
            }
            ApiError::Forbidden { needs } => format!(
                "This key cannot be used here: this route needs {}.",
                needs.describe()
            ),
            ApiError::OtherUser { token_user } => {
                format!("This token acts for user {token_user:?} only.")
            }
            ApiError::TenantDisabled { .. } => {
                "This tenant is disabled; an operator can enable it again.".into()
            }
            ApiError::ChatNotFound(id) => format!("Chat {id} does not exist."),
            ApiError::MessageNotFound(id) => format!("Message {id} is not in this chat."),
            ApiError::TenantNotFound(t) => format!("Tenant {t:?} does not exist."),
            ApiError::ApiKeyNotFound(k) => format!("No such API key: {k:?}."),
            ApiError::Protocol(f) => f.message.clone(),
            ApiError::Validation(v) => format!("Field {} {}.", v.field, v.message),
            ApiError::InvalidParameter { name, .. } => format!("Parameter {name} is invalid."),
            ApiError::InvalidBody { .. } => {
                "The request body does not match the expected schema.".into()
            }
            ApiError::InvalidJson { line, column, .. } => {
                format!("The request body is not valid JSON (line {line}, column {column}).")
            }
            ApiError::UnsupportedMediaType { .. } => "The request body must be JSON.".into(),
            ApiError::PayloadTooLarge { limit } => {
                format!("The request body exceeds {limit} bytes.")
            }
            ApiError::RequestTimeout { seconds } => format!(
                "The request body did not arrive within {seconds} s; send it faster."
            ),
            ApiError::NotFound { method, path } => format!("No route for {method} {path}."),
            ApiError::MethodNotAllowed { method, path, .. } => {
                format!("{path} does not accept {method}.")
            }
            ApiError::Conflict(m) => m.clone(),
            ApiError::RateLimited {
                limit,
                retry_after_secs,
            } => format!(
                "Too many requests: this tenant may make {limit} per minute. Retry in {retry_after_secs} s."
            ),
            ApiError::DatabaseUnavailable => {
                "The database is unavailable; try again shortly.".into()
            }
            ApiError::NotReady(_) => "The server is not ready to serve requests yet.".into(),
            ApiError::ModelNotFound { model, available } => format!(
                "The model {model:?} does not exist on this server; use one of: {}.",
                available.join(", ")
            ),
            ApiError::ModelNotReady => "The model is not loaded yet; try again shortly.".into(),
            ApiError::QueueFull { capacity } => format!(
                "Too many generations are waiting for this tenant (at most {capacity}); try again shortly."
            ),
            ApiError::QuotaExceeded(q) => format!(
                "The {} token budget of this {} ({} per {}) would be exceeded: {} used, this request needs up to {}. It resets at {}.",
                q.period.as_str().replace("day", "daily").replace("month", "monthly"),
                q.scope.as_str(),
                q.limit,
                q.period.as_str(),
                q.used,
                q.requested,
                q.resets_at.to_rfc3339()
            ),
            ApiError::ServerBusy => {
                "The server has too many generations waiting, across all tenants; try again shortly."
                    .into()
            }
            ApiError::ShuttingDown => "The server is shutting down.".into(),
            ApiError::ContextLengthExceeded {
                max_tokens,
                context,
            } => format!(
                "The messages plus max_tokens ({max_tokens}) exceed the model's context of {context} tokens; shorten the messages or lower max_tokens."
            ),
            ApiError::PromptTooLong { tokens, context } => format!(
                "The message needs at least {tokens} tokens but the model's context holds {context}; send a shorter message."
            ),
            ApiError::GenerationInProgress => "A reply is being generated in this chat; wait for it to end or cancel it. The message was not saved.".into(),
            ApiError::NothingToCancel => "There is no reply in progress in this chat.".into(),
            ApiError::TooManyConnections { limit } => {
                format!("The tenant already has {limit} open connections.")
            }
            ApiError::MessageRateLimited { per_second, .. } => format!(
                "Too many messages: at most {per_second} per second on one connection. The message was not processed."
            ),
            ApiError::SlowConsumer { .. } => "The connection fell too far behind the reply stream; reconnect to catch up.".into(),
            ApiError::ReplyNotSaved { .. } => "The reply could not be saved: the database kept failing. It was streamed in full but will not be in the chat's history (a restart marks it interrupted).".into(),
            ApiError::GenerationFailed(_) => {
                "The model failed while generating; the error has been logged.".into()
            }
            ApiError::MetricsUnauthorized => {
                "Send the metrics token as Authorization: Bearer <token>.".into()
            }
            ApiError::MetricsClosed => "Metrics are not served on a public address without a token.".into(),
            ApiError::Internal => "An internal error occurred; it has been logged.".into(),
        }
    }

    /// Context and hints for fixing the request.
    pub fn details(&self) -> Map<String, Value> {
        let v = match self {
            ApiError::MissingApiKey => {
                json!({"header": "X-API-Key", "hint": "Send the tenant API key in the X-API-Key header."})
            }
            ApiError::InvalidApiKey => {
                json!({"header": "X-API-Key", "hint": "Check the key; an operator can issue a new one with `confab key create TENANT`."})
            }
            ApiError::ApiKeyExpired { expired_at } => {
                json!({"header": "X-API-Key", "expired_at": expired_at, "hint": "Ask an operator for a new key (`confab key create TENANT`)."})
            }
            ApiError::Forbidden { needs } => {
                json!({"header": "X-API-Key", "needs": needs.as_str(), "hint": needs.hint()})
            }
            ApiError::OtherUser { token_user } => json!({"user_id": token_user}),
            ApiError::TenantDisabled { since } => json!({"disabled_at": since}),
            ApiError::ChatNotFound(id) => json!({"chat_id": id}),
            ApiError::MessageNotFound(id) => json!({"message_id": id}),
            ApiError::TenantNotFound(t) => json!({"tenant": t}),
            ApiError::ApiKeyNotFound(k) => json!({"key": k}),
            ApiError::Protocol(f) => f.details.clone(),
            ApiError::PromptTooLong { tokens, context } => {
                json!({"prompt_tokens": tokens, "context_length": context})
            }
            ApiError::TooManyConnections { limit } => json!({"limit": limit}),
            ApiError::MessageRateLimited {
                per_second,
                burst,
                retry_after_ms,
            } => json!({
                "retry_after_ms": retry_after_ms,
                "limit_per_second": per_second,
                "burst": burst,
            }),
            ApiError::SlowConsumer { missed } => json!({"missed_events": missed}),
            ApiError::ReplyNotSaved { message_id, reason } => {
                json!({"message_id": message_id, "reason": reason})
            }
            ApiError::GenerationInProgress | ApiError::NothingToCancel => json!({}),
            ApiError::Validation(v) => json!({"field": v.field, "rule": v.rule}),
            ApiError::InvalidParameter { name, reason } => {
                json!({"parameter": name, "reason": reason})
            }
            ApiError::InvalidBody { reason } => json!({"reason": reason}),
            ApiError::InvalidJson {
                reason,
                line,
                column,
            } => {
                json!({"reason": reason, "line": line, "column": column, "hint": "Send a JSON object with Content-Type: application/json."})
            }
            ApiError::UnsupportedMediaType { got } => {
                json!({"content_type": got, "expected": "application/json", "hint": "Set the header Content-Type: application/json."})
            }
            ApiError::PayloadTooLarge { limit } => json!({"max_bytes": limit}),
            ApiError::RequestTimeout { seconds } => {
                json!({"timeout_seconds": seconds, "hint": "The deadline grows with the body's Content-Length (--min-body-bytes-per-sec)."})
            }
            ApiError::NotFound { path, .. } => {
                json!({"path": path, "hint": "See /docs for the available routes."})
            }
            ApiError::MethodNotAllowed {
                method,
                path,
                allowed,
            } => json!({"method": method, "path": path, "allowed": allowed}),
            ApiError::DatabaseUnavailable => json!({"retry_after_seconds": 5}),
            ApiError::RateLimited {
                limit,
                retry_after_secs,
            } => json!({"limit_per_minute": limit, "retry_after_seconds": retry_after_secs}),
            ApiError::NotReady(checks) => Value::Object(checks.clone()),
            ApiError::ModelNotFound { model, available } => {
                json!({"model": model, "available": available})
            }
            // Seconds for HTTP (as Retry-After), milliseconds as WebSocket errors give them.
            ApiError::QueueFull { capacity } => {
                json!({"queue_capacity": capacity, "retry_after_seconds": 1, "retry_after_ms": 1000})
            }
            ApiError::ServerBusy => json!({"retry_after_seconds": 1, "retry_after_ms": 1000}),
            ApiError::QuotaExceeded(q) => {
                let wait = seconds_until(q.resets_at);
                json!({
                    "scope": q.scope.as_str(),
                    "period": q.period.as_str(),
                    "limit": q.limit,
                    "used": q.used,
                    "requested": q.requested,
                    "resets_at": q.resets_at,
                    "retry_after_seconds": wait,
                    "retry_after_ms": wait.saturating_mul(1000),
                })
            }
            ApiError::ModelNotReady | ApiError::ShuttingDown | ApiError::GenerationFailed(_) => {
                json!({})
            }
            ApiError::ContextLengthExceeded {
                max_tokens,
                context,
            } => json!({"max_tokens": max_tokens, "context_length": context}),
            ApiError::MetricsUnauthorized => json!({"header": "Authorization"}),
            ApiError::MetricsClosed => {
                json!({"hint": "Start the server with --metrics-token (CONFAB_METRICS_TOKEN), or with --metrics-public to serve them to anyone."})
            }
            ApiError::Conflict(_) | ApiError::Internal => json!({}),
        };
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// Seconds a client should wait before retrying, sent as `Retry-After`.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::QueueFull { .. } | ApiError::ServerBusy => Some(1),
            ApiError::QuotaExceeded(q) => Some(seconds_until(q.resets_at)),
            ApiError::ShuttingDown => None,
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(5),
            _ => None,
        }
    }

    /// Whether this refuses a request's credentials (no key, a wrong, expired or revoked
    /// one, the wrong kind, a disabled tenant's): what the audit log counts as a failed
    /// authentication.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            ApiError::MissingApiKey
                | ApiError::InvalidApiKey
                | ApiError::ApiKeyExpired { .. }
                | ApiError::Forbidden { .. }
                | ApiError::TenantDisabled { .. }
        )
    }

    /// The close code of a WebSocket connection this error ends (a refused connection, a
    /// socket closed for its behaviour); most errors leave the connection open.
    pub fn close_code(&self) -> u16 {
        match self {
            ApiError::MissingApiKey | ApiError::InvalidApiKey | ApiError::ApiKeyExpired { .. } => {
                close::UNAUTHORIZED
            }
            ApiError::Forbidden { .. }
            | ApiError::OtherUser { .. }
            | ApiError::TenantDisabled { .. } => close::FORBIDDEN,
            ApiError::ChatNotFound(_) => close::NOT_FOUND,
            ApiError::Protocol(f) => f.close,
            ApiError::Validation(_) | ApiError::InvalidParameter { .. } => close::BAD_REQUEST,
            ApiError::TooManyConnections { .. } => close::TOO_MANY,
            ApiError::ShuttingDown => close::GOING_AWAY,
            ApiError::MessageRateLimited { .. } | ApiError::SlowConsumer { .. } => {
                close::POLICY_VIOLATION
            }
            _ => close::INTERNAL_ERROR,
        }
    }

    /// The error as a WebSocket `error` event.
    pub fn to_event(&self) -> Event {
        Event::Error {
            code: self.code(),
            message: self.message(),
            details: Value::Object(self.details()),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.message(),
                details: JsonObject(self.details()),
            },
        }
    }

    /// Maps a storage failure of an operation on one chat.
    pub fn for_chat(chat_id: Uuid) -> impl FnOnce(StoreError) -> ApiError {
        move |e| match e {
            StoreError::NotFound => ApiError::ChatNotFound(chat_id),
            other => other.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                ApiError::DatabaseUnavailable
            }
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::MessageNotFound(id) => ApiError::MessageNotFound(id),
            StoreError::Invalid(m) => {
                ApiError::Validation(ValidationError::new("request", m, json!({})))
            }
            other => {
                tracing::error!(error = ?other, "storage failure");
                ApiError::Internal
            }
        }
    }
}

impl From<crate::chat::ChatError> for ApiError {
    fn from(e: crate::chat::ChatError) -> Self {
        use crate::chat::ChatError as C;
        match e {
            C::GenerationInProgress => ApiError::GenerationInProgress,
            C::QueueFull { capacity } => ApiError::QueueFull { capacity },
            C::ServerBusy => ApiError::ServerBusy,
            C::ModelNotReady => ApiError::ModelNotReady,
            C::ShuttingDown => ApiError::ShuttingDown,
            C::ChatNotFound(id) => ApiError::ChatNotFound(id),
            C::NothingToCancel => ApiError::NothingToCancel,
            C::TooManyConnections { limit } => ApiError::TooManyConnections { limit },
            C::QuotaExceeded(q) => ApiError::QuotaExceeded(Box::new(q)),
            C::Invalid(v) => ApiError::Validation(v),
            C::Store(s) => s.into(),
        }
    }
}

impl From<FrameError> for ApiError {
    fn from(e: FrameError) -> Self {
        ApiError::Protocol(Box::new(e))
    }
}

/// The engine refusing or failing a generation. (The OpenAI API words a prompt that does not
/// fit differently, with its `max_tokens`; it maps those two itself.)
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::PromptTooLong { tokens, context } => {
                ApiError::PromptTooLong { tokens, context }
            }
            EngineError::QueueFull => ApiError::ServerBusy,
            EngineError::InvalidGrammar(m) => ApiError::unenforceable("response_format", m),
            EngineError::InvalidToolSchema { tool, message } => ApiError::unenforceable(
                "tools",
                format!("the parameters of tool {tool:?}: {message}"),
            ),
            EngineError::Stopped => ApiError::ModelNotReady,
            other => {
                tracing::error!(error = %other, "generation failed");
                ApiError::GenerationFailed(other.to_string())
            }
        }
    }
}

impl ApiError {
    /// A `response_format` (at `field`) that constrained decoding cannot hold replies to.
    pub fn unenforceable(field: &str, reason: String) -> ApiError {
        ApiError::Validation(ValidationError::new(
            field,
            format!("cannot be enforced: {reason}"),
            json!({}),
        ))
    }

    /// The headers this error adds to an HTTP response, whatever its body's shape:
    /// `Retry-After`, and `Allow` on a 405 (RFC 9110 §15.5.6).
    pub fn add_headers(&self, resp: &mut Response) {
        if let Some(secs) = self.retry_after_secs() {
            resp.headers_mut()
                .insert("retry-after", poem::http::HeaderValue::from(secs));
        }
        if let ApiError::MethodNotAllowed { allowed, .. } = self {
            if let Ok(v) = poem::http::HeaderValue::from_str(&allowed.join(", ")) {
                resp.headers_mut().insert("allow", v);
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = Json(self.body()).with_status(status).into_response();
        self.add_headers(&mut resp);
        resp
    }
}

/// The error body of every non-2xx response.
#[derive(Debug, Object)]
#[oai(rename = "ErrorBody")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Object)]
#[oai(rename = "ErrorDetail")]
pub struct ErrorDetail {
    /// Stable snake_case identifier, e.g. `chat_not_found`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Context and hints for fixing the request.
    pub details: JsonObject,
}

/// The error statuses an operation documents.
pub trait ErrorSet: Send + Sync + 'static {
    const STATUSES: &'static [u16];
    /// An `/admin/v1` operation (its 401/403/404 mean other things).
    const ADMIN: bool = false;
}

macro_rules! error_set {
    ($(#[$doc:meta])* $name:ident = [$($s:literal),*]) => {
        $(#[$doc])*
        pub struct $name;
        impl ErrorSet for $name {
            const STATUSES: &'static [u16] = &[$($s),*];
        }
    };
    ($(#[$doc:meta])* admin $name:ident = [$($s:literal),*]) => {
        $(#[$doc])*
        pub struct $name;
        impl ErrorSet for $name {
            const STATUSES: &'static [u16] = &[$($s),*];
            const ADMIN: bool = true;
        }
    };
}

error_set!(
    /// Errors of an authenticated operation without a body or chat id.
    Authed = [400, 401, 403, 429, 500, 503]
);
error_set!(
    /// Errors of an authenticated operation on one chat.
    OnChat = [400, 401, 403, 404, 429, 500, 503]
);
error_set!(
    /// Errors of an authenticated operation with a JSON body.
    WithBody = [400, 401, 403, 413, 415, 429, 500, 503]
);
error_set!(
    /// Errors of an authenticated operation on one chat with a JSON body.
    OnChatWithBody = [400, 401, 403, 404, 413, 415, 429, 500, 503]
);
error_set!(
    /// Errors of an admin operation without a body or a tenant.
    admin AdminAuthed = [400, 401, 403, 500, 503]
);
error_set!(
    /// Errors of an admin operation on one tenant (or one of its keys).
    admin AdminOnTenant = [400, 401, 403, 404, 500, 503]
);
error_set!(
    /// Errors of an admin operation with a JSON body.
    admin AdminWithBody = [400, 401, 403, 409, 413, 415, 500, 503]
);
error_set!(
    /// Errors of an admin operation on one tenant with a JSON body.
    admin AdminOnTenantWithBody = [400, 401, 403, 404, 409, 413, 415, 500, 503]
);
error_set!(
    /// Errors of the readiness probe.
    Readiness = [503]
);

fn describe(status: u16, admin: bool) -> &'static str {
    match (status, admin) {
        (401, true) => "The admin key is missing (`missing_api_key`), not valid (`invalid_api_key`) or past its expiry (`api_key_expired`).",
        (403, true) => "The key is a tenant's, not an admin key (`forbidden`).",
        (404, true) => "The tenant or key does not exist (`tenant_not_found`, `api_key_not_found`).",
        (409, true) => "The name is taken (`conflict`).",
        (403, false) => "The key is an admin key (`forbidden`), or its tenant is disabled (`tenant_disabled`).",
        (status, _) => describe_status(status),
    }
}

fn describe_status(status: u16) -> &'static str {
    match status {
        400 => "The request is malformed: invalid JSON, a parameter or field out of range (`validation_error`, `invalid_json`), or a message it names is not in the chat (`message_not_found`).",
        401 => "The API key is missing (`missing_api_key`), not valid (`invalid_api_key`) or past its expiry (`api_key_expired`).",
        404 => "The chat does not exist for this tenant (`chat_not_found`).",
        413 => "The request body is too large (`payload_too_large`).",
        415 => "The request body is not JSON (`unsupported_media_type`).",
        429 => "The tenant made too many requests this minute (`rate_limited`); see Retry-After and the X-RateLimit-* headers.",
        500 => "An internal error (`internal_error`).",
        503 => "The database is unavailable or the server is not ready (`database_unavailable`, `not_ready`); see Retry-After.",
        _ => "Error.",
    }
}

/// An [`ApiError`] as the failure of an operation that documents the statuses of `S`.
pub struct Failure<S: ErrorSet>(pub ApiError, PhantomData<S>);

impl<S: ErrorSet> From<ApiError> for Failure<S> {
    fn from(e: ApiError) -> Self {
        Failure(e, PhantomData)
    }
}

impl<S: ErrorSet> From<StoreError> for Failure<S> {
    fn from(e: StoreError) -> Self {
        Failure(e.into(), PhantomData)
    }
}

impl<S: ErrorSet> From<crate::admin::AdminError> for Failure<S> {
    fn from(e: crate::admin::AdminError) -> Self {
        Failure(e.into(), PhantomData)
    }
}

impl<S: ErrorSet> From<ValidationError> for Failure<S> {
    fn from(e: ValidationError) -> Self {
        Failure(e.into(), PhantomData)
    }
}

impl<S: ErrorSet> IntoResponse for Failure<S> {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

impl<S: ErrorSet> From<Failure<S>> for poem::Error {
    fn from(f: Failure<S>) -> Self {
        let msg = f.0.to_string();
        let mut e = poem::Error::from_response(f.0.into_response());
        e.set_error_message(msg);
        e
    }
}

impl<S: ErrorSet> ApiResponse for Failure<S> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: S::STATUSES
                .iter()
                .map(|&status| MetaResponse {
                    description: describe(status, S::ADMIN),
                    status: Some(status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: "application/json; charset=utf-8",
                        schema: <ErrorBody as poem_openapi::types::Type>::schema_ref(),
                    }],
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        <ErrorBody as poem_openapi::types::Type>::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        assert_eq!(
            ApiError::ChatNotFound(Uuid::nil()).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(ApiError::ChatNotFound(Uuid::nil()).code(), "chat_not_found");
        assert_eq!(
            ApiError::Internal.message(),
            "An internal error occurred; it has been logged."
        );
        let e: ApiError = StoreError::Corrupt("secret detail".into()).into();
        assert!(!e.body().error.message.contains("secret"));
    }

    /// Each transport's form comes from the same variant: the event carries the HTTP body's
    /// three fields, and the close code follows the status.
    #[test]
    fn one_variant_gives_status_event_and_close_code() {
        use crate::chat::ChatError;
        let id = Uuid::nil();
        let cases: Vec<(ApiError, u16, &str, u16)> = vec![
            (
                ChatError::ChatNotFound(id).into(),
                404,
                "chat_not_found",
                4404,
            ),
            (
                ChatError::TooManyConnections { limit: 2 }.into(),
                429,
                "too_many_connections",
                4429,
            ),
            (ChatError::ShuttingDown.into(), 503, "shutting_down", 1001),
            (
                ChatError::GenerationInProgress.into(),
                409,
                "generation_in_progress",
                1011,
            ),
            (
                ChatError::from(crate::chat::scheduler::Refused::QueueFull { capacity: 3 }).into(),
                429,
                "queue_full",
                1011,
            ),
            (ApiError::InvalidApiKey, 401, "invalid_api_key", 4401),
            (
                ApiError::Forbidden {
                    needs: KeyKind::Tenant,
                },
                403,
                "forbidden",
                4403,
            ),
            (
                ApiError::TenantDisabled { since: None },
                403,
                "tenant_disabled",
                4403,
            ),
            (
                ApiError::ApiKeyExpired {
                    expired_at: chrono::Utc::now(),
                },
                401,
                "api_key_expired",
                4401,
            ),
            (
                ApiError::SlowConsumer { missed: 7 },
                429,
                "slow_consumer",
                1008,
            ),
            (
                crate::chat::protocol::Credentials::default()
                    .validate()
                    .unwrap_err()
                    .into(),
                401,
                "missing_api_key",
                4401,
            ),
        ];
        for (e, status, code, close) in cases {
            assert_eq!(
                (e.status().as_u16(), e.code(), e.close_code()),
                (status, code, close)
            );
            let Event::Error {
                code: event_code,
                message,
                details,
            } = e.to_event()
            else {
                panic!("not an error event");
            };
            assert_eq!(event_code, code);
            assert_eq!(message, e.body().error.message);
            assert_eq!(details, Value::Object(e.body().error.details.0));
        }
    }
}
