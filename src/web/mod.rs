//! The browser pages, compiled into the binary (no CDN, no build step): the chat page at `/`
//! (talking to the REST API and `/ws/chat` like any other client) and the admin page at
//! `/admin` (talking to `/admin/v1` with an admin key).

use poem::http::{header, StatusCode};
use poem::{handler, Response};

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");
const COMMON_JS: &str = include_str!("common.js");
const MARKDOWN_JS: &str = include_str!("markdown.js");
const ADMIN: &str = include_str!("admin.html");
const ADMIN_JS: &str = include_str!("admin.js");
const ADMIN_CSS: &str = include_str!("admin.css");
const FAVICON: &str = include_str!("favicon.svg");

/// The content policy of the page: its own scripts, styles and connections (the WebSocket
/// included) only.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .content_type(content_type)
        // Small and versioned with the binary: revalidate rather than risk a stale page
        // after an upgrade.
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
}

#[handler]
pub fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

#[handler]
pub fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

#[handler]
pub fn app_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

/// The pages' icon (linked from both, so browsers do not ask for a missing `/favicon.ico`).
#[handler]
pub fn favicon() -> Response {
    asset(FAVICON, "image/svg+xml")
}

#[handler]
pub fn common_js() -> Response {
    asset(COMMON_JS, "text/javascript; charset=utf-8")
}

/// The chat page's Markdown renderer (replies are shown rendered, never as HTML).
#[handler]
pub fn markdown_js() -> Response {
    asset(MARKDOWN_JS, "text/javascript; charset=utf-8")
}

#[handler]
pub fn admin() -> Response {
    asset(ADMIN, "text/html; charset=utf-8")
}

#[handler]
pub fn admin_js() -> Response {
    asset(ADMIN_JS, "text/javascript; charset=utf-8")
}

#[handler]
pub fn admin_css() -> Response {
    asset(ADMIN_CSS, "text/css; charset=utf-8")
}

/// Whether `path` is one of the pages' (it gets [`CSP`]).
pub fn is_page(path: &str) -> bool {
    path == "/" || path == "/admin" || path.starts_with("/assets/")
}
