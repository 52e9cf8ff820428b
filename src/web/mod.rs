//! The browser chat page at `/`: three files compiled into the binary (no CDN, no build
//! step), talking to the REST API and `/ws/chat` like any other client.

use poem::http::{header, StatusCode};
use poem::{handler, Response};

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

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

/// Whether `path` is one of the page's (it gets [`CSP`]).
pub fn is_page(path: &str) -> bool {
    path == "/" || path.starts_with("/assets/")
}
