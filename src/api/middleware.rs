//! The layer around every route: body limits, one error shape, access log.
//!
//! - Request bodies are read here, up to the configured limit (413 `payload_too_large`
//!   otherwise, before the whole body is buffered), and JSON bodies are checked for syntax
//!   so that malformed JSON (`invalid_json`) is told apart from well-formed JSON of the wrong
//!   shape (`validation_error`).
//! - Errors raised by the framework (unknown route, wrong method, missing header, bad path
//!   parameter, schema mismatch) become [`ApiError`]s, so every non-2xx body has one shape.
//! - The access log carries method, path (never the query string, which may hold a key),
//!   status and latency.
//! - `/api` and `/v1` requests are authenticated and counted against the tenant's quota
//!   first (`X-RateLimit-*` headers), `/admin/v1` requests need an admin key; every response gets security headers and an `X-Request-ID`
//!   (the client's, or a new one), which every log line of the request carries along with
//!   the tenant id.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use poem_openapi::error::{
    AuthorizationError, ContentTypeError, ParseParamError, ParsePathError, ParseRequestPayloadError,
};

use super::quota::Decision;
use super::AppState;
use crate::audit::Via;
use crate::error::ApiError;

fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .map(|mt| {
            let mt = mt.trim().to_ascii_lowercase();
            mt == "application/json" || mt.ends_with("+json")
        })
        .unwrap_or(false)
}

/// Reads and checks the body of a request that carries one; puts it back when it is fine.
///
/// Only operations that take a body (`routes`) have it read: on every other route and
/// method (`POST /healthz`, `POST /api/v1/usage`, the page, …) the body is dropped unread,
/// so a client cannot make the server buffer what nothing will use. The API operations
/// reach this after their key was checked and the request counted. The whole body must
/// arrive within the connection limits' deadline for its declared size.
async fn guard_body(
    req: &mut Request,
    path: &str,
    routes: &RouteTable,
    limit: usize,
    connections: &crate::server::ConnectionLimits,
) -> Result<(), ApiError> {
    if !routes.takes_body(req.method(), path) {
        req.take_body();
        return Ok(());
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let deadline = connections.body_deadline(declared.unwrap_or(limit as u64));
    let bytes = tokio::time::timeout(deadline, req.take_body().into_bytes_limit(limit))
        .await
        .map_err(|_| ApiError::RequestTimeout {
            seconds: deadline.as_secs(),
        })?
        .map_err(|e| match e {
            poem::error::ReadBodyError::PayloadTooLarge => ApiError::PayloadTooLarge { limit },
            other => ApiError::InvalidBody {
                reason: other.to_string(),
            },
        })?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if is_json(content_type) {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::InvalidJson {
                reason: "the body is empty".into(),
                line: 1,
                column: 0,
            });
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            return Err(ApiError::InvalidJson {
                reason: e.to_string(),
                line: e.line(),
                column: e.column(),
            });
        }
    }
    req.set_body(Body::from_bytes(bytes));
    Ok(())
}

/// The routes of the OpenAPI document: the names of their path parameters and which
/// methods take a request body.
///
/// poem-openapi reports a bad path parameter by position (`param0`), not by name; this
/// recovers the name the client sees in the documentation. The body methods decide which
/// requests have their body read at all.
pub struct RouteTable {
    routes: Vec<RouteEntry>,
}

struct RouteEntry {
    /// As OpenAPI writes it (`/api/v1/chats/{chat_id}`): the route's metrics label.
    template: String,
    segments: Vec<Segment>,
    /// Methods this route answers (sent as `Allow` with a 405).
    methods: Vec<Method>,
    /// Methods of this route that take a request body.
    body_methods: Vec<Method>,
}

enum Segment {
    Literal(String),
    Param(String),
    /// `*`, last: any rest of the path (a nested service such as `/docs/*`).
    Rest,
}

fn segments(template: &str) -> Vec<Segment> {
    template
        .split('/')
        .map(|seg| {
            if seg == "*" {
                return Segment::Rest;
            }
            match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Segment::Param(name.to_string()),
                None => Segment::Literal(seg.to_string()),
            }
        })
        .collect()
}

impl RouteEntry {
    fn new(template: &str, methods: Vec<Method>, body_methods: Vec<Method>) -> RouteEntry {
        RouteEntry {
            template: template.trim_end_matches("/*").to_string(),
            segments: segments(template),
            methods,
            body_methods,
        }
    }

    fn matches(&self, segs: &[&str]) -> bool {
        if let Some(Segment::Rest) = self.segments.last() {
            let fixed = &self.segments[..self.segments.len() - 1];
            return segs.len() >= fixed.len() && Self::each_matches(fixed, &segs[..fixed.len()]);
        }
        self.segments.len() == segs.len() && Self::each_matches(&self.segments, segs)
    }

    fn each_matches(template: &[Segment], segs: &[&str]) -> bool {
        template.iter().zip(segs).all(|(t, s)| match t {
            Segment::Literal(l) => l == s,
            Segment::Param(_) | Segment::Rest => true,
        })
    }

    fn params(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| !matches!(s, Segment::Literal(_)))
            .count()
    }
}

impl RouteTable {
    pub fn from_spec(spec: &str) -> RouteTable {
        let doc: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let routes = doc["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .iter()
                    .map(|(template, ops)| {
                        let ops = ops.as_object().cloned().unwrap_or_default();
                        let method = |m: &String| m.to_ascii_uppercase().parse().ok();
                        RouteEntry::new(
                            template,
                            ops.keys().filter_map(method).collect(),
                            ops.iter()
                                .filter(|(_, op)| op.get("requestBody").is_some())
                                .filter_map(|(m, _)| method(m))
                                .collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        RouteTable { routes }
    }

    /// Adds a route outside the document (the page, the OpenAI-compatible ones, …): its one
    /// method, and whether that takes a body.
    /// A template ending in `/*` covers every path under it (a nested service).
    pub fn add(&mut self, method: Method, template: &str, takes_body: bool) {
        let body_methods = if takes_body {
            vec![method.clone()]
        } else {
            Vec::new()
        };
        self.routes
            .push(RouteEntry::new(template, vec![method], body_methods));
    }

    /// The route `path` is served by, as its template (`/api/v1/chats/{chat_id}`), for
    /// metrics labels: a client cannot grow the series count by inventing URLs. A literal
    /// segment wins over a parameter (`/chats/user/x` is not `/chats/{chat_id}/…`).
    pub fn template(&self, path: &str) -> Option<&str> {
        self.matching(path)
            .min_by_key(|r| r.params())
            .map(|r| r.template.as_str())
    }

    /// The routes whose template matches `path` (a trailing slash ignored).
    fn matching<'a, 'p>(
        &'a self,
        path: &'p str,
    ) -> impl Iterator<Item = &'a RouteEntry> + use<'a, 'p> {
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        self.routes.iter().filter(move |r| r.matches(&segs))
    }

    /// The methods `path` answers, for the `Allow` header of a 405.
    fn allowed(&self, path: &str) -> Vec<String> {
        let mut methods: Vec<String> = self
            .matching(path)
            .flat_map(|r| r.methods.iter().map(|m| m.to_string()))
            .collect();
        methods.sort();
        methods.dedup();
        methods
    }

    /// Whether `method` on `path` is an operation that takes a request body.
    fn takes_body(&self, method: &Method, path: &str) -> bool {
        self.matching(path).any(|r| r.body_methods.contains(method))
    }

    /// The name of the `index`-th parameter of the route that `path` matches. Literal
    /// segments must match exactly, so `/chats/user/x` is not taken for `/chats/{chat_id}`.
    fn name(&self, path: &str, index: usize) -> Option<&str> {
        self.matching(path)
            .find(|r| r.segments.iter().any(|s| matches!(s, Segment::Param(_))))
            .and_then(|r| {
                r.segments
                    .iter()
                    .filter_map(|t| match t {
                        Segment::Param(n) => Some(n.as_str()),
                        Segment::Literal(_) | Segment::Rest => None,
                    })
                    .nth(index)
            })
    }
}

/// Which error shape a path answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `{"error": {"code", "message", "details"}}`: everything but the OpenAI routes.
    Native,
    /// OpenAI's `{"error": {"message", "type", "param", "code"}}` under `/v1/`.
    OpenAi,
    /// Anthropic's `{"type": "error", "error": {"type", "message"}}` under `/v1/messages`.
    Anthropic,
}

impl Style {
    fn of(path: &str) -> Style {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Style::Anthropic
        } else if path.starts_with("/v1/") {
            Style::OpenAi
        } else {
            Style::Native
        }
    }

    fn render(self, e: ApiError) -> Response {
        match self {
            Style::Native => e.into_response(),
            Style::OpenAi => super::openai::OpenAiError(e).into_response(),
            Style::Anthropic => super::anthropic::AnthropicError(e).into_response(),
        }
    }
}

/// Turns an error raised by poem or poem-openapi into our error.
fn classify(
    err: poem::Error,
    method: &Method,
    path: &str,
    params: &RouteTable,
    style: Style,
) -> Response {
    if err.is_from_response() {
        return err.into_response();
    }
    let api = if err.is::<poem::error::NotFoundError>() {
        ApiError::NotFound {
            method: method.to_string(),
            path: path.to_string(),
        }
    } else if err.is::<poem::error::MethodNotAllowedError>() {
        ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed: params.allowed(path),
        }
    } else if err.is::<AuthorizationError>() {
        ApiError::MissingApiKey
    } else if let Some(p) = err.downcast_ref::<ParsePathError>() {
        let index = p
            .name
            .strip_prefix("param")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let name = params.name(path, index).unwrap_or(p.name);
        ApiError::InvalidParameter {
            name: name.to_string(),
            reason: p.reason.clone(),
        }
    } else if let Some(p) = err.downcast_ref::<ParseParamError>() {
        ApiError::InvalidParameter {
            name: p.name.to_string(),
            reason: p.reason.clone(),
        }
    } else if let Some(p) = err.downcast_ref::<ParseRequestPayloadError>() {
        ApiError::InvalidBody {
            reason: p.reason.clone(),
        }
    } else if let Some(c) = err.downcast_ref::<ContentTypeError>() {
        ApiError::UnsupportedMediaType {
            got: match c {
                ContentTypeError::NotSupported { content_type } => Some(content_type.clone()),
                _ => None,
            },
        }
    } else if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit: 0 }
    } else if err.status().is_client_error() {
        ApiError::InvalidBody {
            reason: err.to_string(),
        }
    } else {
        tracing::error!(error = %err, "unhandled error");
        ApiError::Internal
    };
    style.render(api)
}

/// Wraps the whole application; see the module docs.
pub async fn around<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    state: AppState,
    params: Arc<RouteTable>,
) -> poem::Result<Response> {
    normalize_uri(&mut req);
    let request_id = request_id(&req);
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        tenant_id = tracing::field::Empty
    );
    let mut resp = handle(ep, req, state, params).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

/// The client's `X-Request-ID` when it is a plain token (1–128 of `A-Z a-z 0-9 . _ -`),
/// else a new UUID: every log line of the request and its response carry it, so it must
/// not be able to hold the `=`, `:`, `}` or spaces that would let it pass for another
/// field or log line.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_plain_token(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

fn is_plain_token(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The path with empty and `.` segments removed and `..` applied, so `//api/v1/chats`,
/// `/api/./v1/chats` and `/x/../api/v1/chats` are `/api/v1/chats` to everything after this
/// (key check, rate limit, routing, metrics, log) alike. A trailing slash is kept (routing
/// trims it later); `None` when the path is already normal.
fn normal_path(path: &str) -> Option<String> {
    let needs = path.contains("//") || path.split('/').any(|seg| seg == "." || seg == "..");
    if !needs {
        return None;
    }
    let mut segs: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    if out.is_empty() || trailing {
        out.push('/');
    }
    Some(out)
}

fn normalize_uri(req: &mut Request) {
    let Some(path) = normal_path(req.uri().path()) else {
        return;
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = poem::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

async fn handle<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    state: AppState,
    params: Arc<RouteTable>,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let style = Style::of(&path);
    // `/api` and `/v1` requests are authenticated and counted (`/admin/v1` ones need an
    // admin key) before anything else, the body included: a client without a working key
    // learns nothing but 401, and a tenant over its quota costs no more than a (cached) key
    // lookup.
    let quota = match admin_gate(&req, &path, &state).await {
        Err(e) => Err((e, Via::Admin)),
        Ok(()) => rest_quota(&req, &path, &state)
            .await
            .map_err(|e| (e, Via::Rest)),
    };
    let quota = quota.map_err(|(e, via)| {
        if e.is_auth_failure() {
            let address = req.remote_addr().as_socket_addr().map(|a| a.ip());
            state.audit.auth_failed(address, via, e.code());
        }
        e
    });
    let quota = match quota {
        Err(e) => Err(Err(e)),
        Ok(Some((_, d))) if !d.allowed => Err(Ok(d)),
        Ok(Some((caller, d))) => {
            // The operation's key check finds the tenant here instead of looking it up again.
            req.extensions_mut().insert(Authenticated(caller));
            Ok(Some(d))
        }
        Ok(None) => Ok(None),
    };
    let mut resp = match quota {
        Err(Err(e)) => style.render(e),
        Err(Ok(d)) => {
            let mut r = style.render(ApiError::RateLimited {
                limit: d.limit,
                retry_after_secs: d.reset_secs,
            });
            set_quota_headers(&mut r, &d);
            r
        }
        Ok(decision) => {
            // An import carries a whole chat: it has a bound of its own.
            let limit = if path == super::transfer::IMPORT_PATH {
                state.limits.max_import_bytes
            } else {
                state.limits.max_body_bytes
            };
            let guarded = guard_body(&mut req, &path, &params, limit, &state.connections).await;
            let mut r = match guarded {
                Err(e) => style.render(e),
                Ok(()) => match ep.call(req).await {
                    Ok(r) => r.into_response(),
                    Err(e) => classify(e, &method, &path, &params, style),
                },
            };
            if let Some(d) = decision {
                set_quota_headers(&mut r, &d);
            }
            r
        }
    };
    security_headers(&mut resp, &path);
    let m = crate::metrics::metrics();
    m.observe_http(
        params.template(&path).unwrap_or("other"),
        method.as_str(),
        resp.status().as_u16(),
        started.elapsed(),
    );
    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
        m.rate_limited.with_label_values(&["rest"]).inc();
    }
    tracing::info!(
        target: "confab::access",
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
    );
    resp
}

/// `/admin/v1` requests need an admin key (checked here, like tenant keys on `/api`, before
/// the body is read); no other path does.
async fn admin_gate(req: &Request, path: &str, state: &AppState) -> Result<(), ApiError> {
    if path != "/admin/v1" && !path.starts_with("/admin/v1/") {
        return Ok(());
    }
    let key = key_header(req, "x-api-key").ok_or(ApiError::MissingApiKey)??;
    state.auth.authenticate_admin(key).await.map(|_| ())
}

/// A header that carries a key: absent, or its text (a value that is not text is no key).
fn key_header<'r>(req: &'r Request, name: &str) -> Option<Result<&'r str, ApiError>> {
    req.headers()
        .get(name)
        .map(|v| v.to_str().map_err(|_| ApiError::InvalidApiKey))
}

/// The caller of an `/api` or `/v1` request whose key this layer already checked.
#[derive(Debug, Clone)]
pub struct Authenticated(pub super::auth::Caller);

/// For an `/api` or `/v1` request: its tenant and quota verdict, or why it has no tenant.
/// `None` for other paths.
async fn rest_quota(
    req: &Request,
    path: &str,
    state: &AppState,
) -> Result<Option<(super::auth::Caller, Decision)>, ApiError> {
    let openai = path.starts_with("/v1/");
    if !path.starts_with("/api/") && !openai {
        return Ok(None);
    }
    let header = |name: &str| key_header(req, name);
    // OpenAI clients send the key as a bearer token; `X-API-Key` works there too.
    let bearer = if openai {
        header("authorization").map(|v| {
            v.and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .map(str::trim)
                    .ok_or(ApiError::InvalidApiKey)
            })
        })
    } else {
        None
    };
    let key = header("x-api-key")
        .or(bearer)
        .ok_or(ApiError::MissingApiKey)??;
    let caller = state.auth.authenticate(key).await?;
    let tenant = caller.tenant;
    tracing::Span::current().record("tenant_id", tracing::field::display(tenant));
    Ok(Some((caller, state.quotas.check_rest(tenant).await)))
}

fn set_quota_headers(resp: &mut Response, d: &Decision) {
    for (name, value) in d.headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
}

/// Headers every response carries: no MIME sniffing, no framing, no referrer, and a content
/// policy that allows nothing for the API and only same-origin assets for Swagger UI.
fn security_headers(resp: &mut Response, path: &str) {
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    let csp = if crate::web::is_page(path) {
        crate::web::CSP
    } else if path.starts_with("/docs") {
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
    } else {
        "default-src 'none'; frame-ancestors 'none'"
    };
    h.insert("content-security-policy", HeaderValue::from_static(csp));
    let api = ["/api/", "/v1/", "/admin/v1/"]
        .iter()
        .any(|p| path.starts_with(p));
    if api && !h.contains_key("cache-control") {
        h.insert("cache-control", HeaderValue::from_static("no-store"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_parameter_names() {
        let spec = r#"{"paths": {"/a/{x}": {}, "/a/user/{u}": {}, "/a/{x}/m/{y}": {}, "/b": {}}}"#;
        let p = RouteTable::from_spec(spec);
        assert_eq!(p.name("/a/zz", 0), Some("x"));
        assert_eq!(p.name("/a/user/zz", 0), Some("u"));
        assert_eq!(p.name("/a/1/m/2", 1), Some("y"));
        assert_eq!(p.name("/a/1/m/2/", 1), Some("y"));
        assert_eq!(p.name("/c/1", 0), None);
    }

    #[test]
    fn only_operations_with_a_body_have_it_read() {
        let spec = r#"{"paths": {"/a": {"post": {"requestBody": {}}, "get": {}},
            "/a/{x}": {"patch": {"requestBody": {}}, "delete": {}}, "/u": {"get": {}}}}"#;
        let mut r = RouteTable::from_spec(spec);
        r.add(Method::POST, "/v1/c", true);
        r.add(Method::GET, "/m", false);
        assert!(r.takes_body(&Method::POST, "/a"));
        assert!(r.takes_body(&Method::POST, "/a/"));
        assert!(r.takes_body(&Method::PATCH, "/a/7"));
        assert!(r.takes_body(&Method::POST, "/v1/c"));
        assert!(!r.takes_body(&Method::GET, "/a"));
        assert!(!r.takes_body(&Method::POST, "/a/7"));
        assert!(!r.takes_body(&Method::DELETE, "/a/7"));
        assert!(!r.takes_body(&Method::POST, "/u"));
        assert!(!r.takes_body(&Method::POST, "/healthz"));
        assert!(!r.takes_body(&Method::GET, "/m"));
    }

    #[test]
    fn metrics_label_a_path_with_its_route_template() {
        let spec = r#"{"paths": {"/api/v1/chats": {"post": {}},
            "/api/v1/chats/{chat_id}": {"get": {}},
            "/api/v1/chats/{chat_id}/messages": {"get": {}},
            "/api/v1/chats/user/{user_id}": {"get": {}}}}"#;
        let mut r = RouteTable::from_spec(spec);
        r.add(Method::GET, "/docs/*", false);
        assert_eq!(r.template("/api/v1/chats/"), Some("/api/v1/chats"));
        assert_eq!(
            r.template("/api/v1/chats/abc"),
            Some("/api/v1/chats/{chat_id}")
        );
        assert_eq!(
            r.template("/api/v1/chats/abc/messages"),
            Some("/api/v1/chats/{chat_id}/messages")
        );
        assert_eq!(
            r.template("/api/v1/chats/user/bob"),
            Some("/api/v1/chats/user/{user_id}")
        );
        assert_eq!(r.template("/docs"), Some("/docs"));
        assert_eq!(r.template("/docs/index.css"), Some("/docs"));
        assert_eq!(r.template("/whatever/x"), None);
    }

    #[test]
    fn a_path_allows_the_methods_of_its_routes() {
        let spec = r#"{"paths": {"/a": {"post": {}, "get": {}}, "/a/{x}": {"delete": {}}}}"#;
        let mut r = RouteTable::from_spec(spec);
        r.add(Method::GET, "/m", false);
        assert_eq!(r.allowed("/a"), ["GET", "POST"]);
        assert_eq!(r.allowed("/a/7"), ["DELETE"]);
        assert_eq!(r.allowed("/m"), ["GET"]);
        assert!(r.allowed("/nowhere").is_empty());
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normal_path("/api/v1/chats"), None);
        assert_eq!(normal_path("/api/v1/chats/"), None);
        assert_eq!(
            normal_path("//api/v1/chats").as_deref(),
            Some("/api/v1/chats")
        );
        assert_eq!(normal_path("//v1//models").as_deref(), Some("/v1/models"));
        assert_eq!(normal_path("/x/../api/./v1").as_deref(), Some("/api/v1"));
        assert_eq!(normal_path("/../../api").as_deref(), Some("/api"));
        assert_eq!(normal_path("//").as_deref(), Some("/"));
        assert_eq!(normal_path("/api//").as_deref(), Some("/api/"));
    }

    #[test]
    fn request_ids_are_plain_tokens() {
        assert!(is_plain_token("abc-DEF_1.2"));
        for bad in ["", "a b", "a=b", "x}", "k:v", "é", &"a".repeat(129)] {
            assert!(!is_plain_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("application/json; charset=utf-8")));
        assert!(is_json(Some("Application/JSON")));
        assert!(is_json(Some("application/merge-patch+json")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(None));
    }
}
