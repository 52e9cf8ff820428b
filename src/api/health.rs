//! Liveness and readiness probes; no API key needed.

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};
use serde_json::{json, Map};

use super::dto::{HealthDto, ModelInfoDto, ReadyDto};
use super::{ApiTags, AppState};
use crate::cluster::ClusterHealth;
use crate::engine::ModelStatus;
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
    /// Ready when the database answers and the model is loaded. While not ready, the 503
    /// body's `details` say which part is missing (`database`, `model`). A replica of a
    /// cluster that cannot reach Redis is `degraded`: it answers 200 and serves alone.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self, state: Data<&AppState>) -> Result<Ready, Failure<Readiness>> {
        let mut checks = Map::new();
        let database = match state.store.ping().await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(error = %e, "readiness: database");
                "unavailable"
            }
        };
        checks.insert("database".into(), json!(database));
        let (model, model_name, model_info) = match state.model.status() {
            ModelStatus::Ready(h) => (
                "ready",
                Some(h.info.name.clone()),
                Some(ModelInfoDto {
                    architecture: h.info.architecture.clone(),
                    quantization: h.info.quantization.clone(),
                    parameters: h.info.parameters,
                    context_length: h.info.context_length as u64,
                }),
            ),
            #[cfg(feature = "test-hooks")]
            ModelStatus::NotConfigured => ("not_configured", None, None),
            ModelStatus::Loading => ("loading", None, None),
            ModelStatus::Failed(reason) => {
                checks.insert("model_error".into(), json!(reason));
                ("failed", None, None)
            }
        };
        checks.insert("model".into(), json!(model));
        let (cluster, cluster_detail) = match state.cluster.as_ref().map(|c| c.health()) {
            None => ("off", None),
            Some(ClusterHealth::Ok) => ("ok", None),
            Some(ClusterHealth::Degraded(why)) => ("degraded", Some(why)),
        };
        if database == "ok" && matches!(model, "ready" | "not_configured") {
            Ok(Ready::Ok(Json(ReadyDto {
                status: if cluster == "degraded" {
                    "degraded"
                } else {
                    "ready"
                }
                .into(),
                database: database.into(),
                model: model.into(),
                model_name,
                model_info,
                cluster: cluster.into(),
                cluster_detail,
            })))
        } else {
            Err(ApiError::NotReady(checks).into())
        }
    }
}
