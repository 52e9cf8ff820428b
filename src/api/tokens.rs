//! `POST /api/v1/tokens`: user-scoped tokens, so a browser never holds the tenant key.
//!
//! The tenant's backend (holding the tenant key) mints a short-lived token for one of its
//! users and hands it to that user's browser, which uses it wherever a tenant key goes
//! (`X-API-Key`, the WebSocket's `api_key`, the OpenAI API's bearer token). A token acts for
//! its user only: another user's chats do not exist for it (404 `chat_not_found`), acting
//! for another user is 403 `forbidden`, and it cannot mint tokens or read the tenant's usage.

use chrono::Utc;
use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::auth::TenantAuth;
use super::types::{RuledText, Timestamp, UserIdRule};
use super::{ApiTags, AppState};
use crate::domain;
use crate::error::{ApiError, Failure, WithBody};

/// A token to mint.
#[derive(Debug, Object)]
#[oai(rename = "CreateTokenRequest")]
pub struct CreateTokenRequest {
    /// The user the token acts for (created on first use, as with chats).
    pub user_id: RuledText<UserIdRule>,
    /// How long the token works, in seconds (1 to the server's `--max-token-ttl-secs`,
    /// 86400 by default).
    #[oai(validator(minimum(value = "1")))]
    pub ttl_seconds: u64,
}

/// A minted token: its secret is shown this once.
#[derive(Debug, Object)]
#[oai(rename = "UserToken")]
pub struct TokenDto {
    /// The secret (`cfu_…`): send it as `X-API-Key` (or `api_key` on the WebSocket).
    pub token: String,
    /// Its id: the usage of what it does is recorded under this key id.
    pub token_id: Uuid,
    pub user_id: String,
    pub expires_at: Timestamp,
}

#[derive(ApiResponse)]
pub enum CreatedToken {
    /// The token.
    #[oai(status = 201)]
    Created(Json<TokenDto>),
}

/// The token operation.
pub struct TokensApi;

#[OpenApi(tag = "ApiTags::Chats")]
impl TokensApi {
    /// Mint a user-scoped token
    ///
    /// Needs the tenant key (a token cannot mint tokens). The token acts for `user_id`
    /// only, for `ttl_seconds`: give it to that user's browser instead of the tenant key.
    #[oai(
        path = "/api/v1/tokens",
        method = "post",
        operation_id = "create_token"
    )]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        body: Json<CreateTokenRequest>,
    ) -> Result<CreatedToken, Failure<WithBody>> {
        auth.0.tenant_key_only()?;
        let user_id = body.0.user_id.0;
        domain::validate_user_id("user_id", &user_id)?;
        let max = state.limits.max_token_ttl_secs;
        let ttl = body.0.ttl_seconds;
        if ttl > max {
            return Err(ApiError::Validation(domain::ValidationError::new(
                "ttl_seconds",
                format!("must be at most {max} (--max-token-ttl-secs), got {ttl}"),
                serde_json::json!({"maximum": max}),
            ))
            .into());
        }
        let secret = crate::credentials::generate_user_token();
        let expires_at = Utc::now() + chrono::Duration::seconds(ttl.min(i64::MAX as u64) as i64);
        let token = state
            .store
            .create_user_token(auth.0.tenant, auth.0.key_id, &user_id, &secret, expires_at)
            .await?;
        Ok(CreatedToken::Created(Json(TokenDto {
            token: secret.secret,
            token_id: token.id,
            user_id: token.user_id,
            expires_at: token.expires_at.into(),
        })))
    }
}
