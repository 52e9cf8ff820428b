//! The published OpenAPI document and Swagger UI.

use reqwest::{Method, StatusCode};

use crate::common::{Backend, TestServer};

const COMMITTED: &str = include_str!("../../openapi/openapi.json");

#[test]
fn committed_spec_matches_generated() {
    let generated = confab::api::openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"),
            format!("{generated}\n"),
        )
        .unwrap();
        return;
    }
    assert_eq!(
        COMMITTED.trim_end(),
        generated.trim_end(),
        "openapi/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test committed_spec` or `confab openapi > openapi/openapi.json`"
    );
}

#[test]
fn spec_declares_the_key_and_errors() {
    let spec: serde_json::Value = serde_json::from_str(COMMITTED).unwrap();
    let scheme = &spec["components"]["securitySchemes"]["TenantAuth"];
    assert_eq!(scheme["type"], "apiKey");
    assert_eq!(scheme["name"], "X-API-Key");
    assert_eq!(scheme["in"], "header");
    let get = &spec["paths"]["/api/v1/chats/{chat_id}"]["get"];
    for code in ["200", "400", "401", "404", "500", "503"] {
        assert!(
            get["responses"][code].is_object(),
            "GET chat documents {code}"
        );
    }
    let create = &spec["paths"]["/api/v1/chats"]["post"];
    for code in ["201", "400", "401", "413", "415"] {
        assert!(
            create["responses"][code].is_object(),
            "POST chats documents {code}"
        );
    }
}

async fn served_spec_and_docs(b: Backend) {
    let s = TestServer::start(b).await;
    let (st, v) = s.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let committed: serde_json::Value = serde_json::from_str(COMMITTED).unwrap();
    assert_eq!(v, committed);
    let resp = s.http.get(format!("{}/docs", s.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "Swagger UI page");
    assert!(
        !html.contains("cdn") && !html.contains("unpkg"),
        "assets are embedded, no CDN"
    );
    s.stop().await;
}

crate::backend_tests!(served_spec_and_docs);
