//! Liveness and readiness probes; no API key needed.

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};
use serde_json::{json, Map};

use super::dto::{HealthDto, ReadyDto};
use super::{ApiTags, AppState};
use crate::error::{ApiError, Failure, Readiness};

#[derive(ApiResponse)]
pub enum Alive {
    /// The process is up.
    #[oai(status = 200)]
    Ok(Json<HealthDto>),
}

#[derive(ApiResponse)]
pub enum Ready {
    /// The server can serve requests.
    #[oai(status = 200)]
    Ok(Json<ReadyDto>),
}

/// The probes.
pub struct HealthApi;

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness
    ///
    /// Answers while the process runs.
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> Alive {
        Alive::Ok(Json(HealthDto {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    /// Readiness
    ///
    /// Ready when the database answers.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self, state: Data<&AppState>) -> Result<Ready, Failure<Readiness>> {
        match state.store.ping().await {
            Ok(()) => Ok(Ready::Ok(Json(ReadyDto {
                status: "ready".into(),
                database: "ok".into(),
            }))),
            Err(e) => {
                tracing::warn!(error = %e, "readiness check failed");
                let mut checks = Map::new();
                checks.insert("database".into(), json!("unavailable"));
                Err(ApiError::NotReady(checks).into())
            }
        }
    }
}
