//! `GET /api/v1/chats/{chat_id}/export` and `POST /api/v1/chats/import`: a chat out as JSON
//! (the whole tree, in the form the import takes back) or Markdown (the active branch), and a
//! chat in from such a JSON or from an OpenAI-style `messages` list.

use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, ResponseContent};
use uuid::Uuid;

use super::auth::TenantAuth;
use super::dto::{ChatConfigDto, ChatDto, CreateChatRequest, MessageStatusDto, RoleDto, UsageDto};
use super::types::{JsonObject, Timestamp};
use super::{ApiTags, AppState};
use crate::domain::{self, BranchView, ImportMessage, Order, PageRequest};
use crate::error::{ApiError, Failure, OnChat, WithBody};

/// The import's route: the body limit middleware gives it `--max-import-bytes`.
pub const IMPORT_PATH: &str = "/api/v1/chats/import";

/// What an export says it is; an import checks it when given.
const FORMAT: &str = "confab.chat";
const VERSION: u32 = 1;

/// A whole chat: its settings and every message of every branch.
#[derive(Debug, Object)]
#[oai(rename = "ChatExport")]
pub struct ChatExportDto {
    /// Always `confab.chat`.
    pub format: String,
    /// Version of the format; 1.
    pub version: u32,
    pub exported_at: Timestamp,
    pub chat_id: Uuid,
    pub user_id: String,
    #[oai(nullable)]
    pub title: Option<String>,
    pub metadata: JsonObject,
    pub config: ChatConfigDto,
    pub created_at: Timestamp,
    /// The active branch's leaf; null for an empty chat.
    #[oai(nullable)]
    pub active_message_id: Option<Uuid>,
    /// In order of writing; each names its parent.
    pub messages: Vec<ExportedMessageDto>,
}

/// A message of an export.
#[derive(Debug, Object)]
#[oai(rename = "ExportedMessage")]
pub struct ExportedMessageDto {
    pub id: Uuid,
    #[oai(nullable)]
    pub parent_id: Option<Uuid>,
    pub role: RoleDto,
    pub content: String,
    pub metadata: JsonObject,
    pub status: MessageStatusDto,
    #[oai(nullable)]
    pub usage: Option<UsageDto>,
    pub created_at: Timestamp,
}

/// Body of `POST /api/v1/chats/import`: an export (`GET …/export?format=json`) or any chat
/// as a `messages` list with the fields of `POST /api/v1/chats/`.
#[derive(Debug, Object)]
#[oai(rename = "ImportChatRequest")]
pub struct ImportChatRequest {
    /// The chat's owner (an export's own `user_id`, or another) and settings, as
    /// `POST /api/v1/chats/` takes them.
    #[oai(flatten)]
    pub chat: CreateChatRequest,
    /// `confab.chat` when the body is an export; other values are refused.
    #[oai(nullable)]
    pub format: Option<String>,
    /// The export format's version (1).
    #[oai(nullable)]
    pub version: Option<u32>,
    /// Which message's branch is active (an `id` of `messages`); default: the last leaf.
    #[oai(nullable)]
    pub active_message_id: Option<String>,
    /// With an `id` on every message, a tree through `parent_id` (null: a root) in any
    /// order; without ids, one branch in list order (OpenAI's `messages`).
    pub messages: Vec<ImportMessageDto>,
}

/// A message to import.
#[derive(Debug, Object)]
#[oai(rename = "ImportMessage")]
pub struct ImportMessageDto {
    /// The source's id of the message (1–128 characters); new ids are given on import.
    #[oai(validator(min_length = 1, max_length = 128))]
    pub id: Option<String>,
    #[oai(nullable, validator(min_length = 1, max_length = 128))]
    pub parent_id: Option<String>,
    pub role: RoleDto,
    pub content: String,
    #[oai(nullable)]
    pub metadata: Option<JsonObject>,
    /// Default `complete`; a `streaming` one is imported as `interrupted`.
    #[oai(nullable)]
    pub status: Option<MessageStatusDto>,
    /// Kept when given; default: the time of the import.
    #[oai(nullable)]
    pub created_at: Option<Timestamp>,
}

/// `format` of an export.
#[derive(Debug, Clone, Copy, Default, Enum)]
#[oai(rename = "ExportFormat", rename_all = "lowercase")]
pub enum ExportFormat {
    /// The whole tree, in the form `POST /api/v1/chats/import` takes.
    #[default]
    Json,
    /// The active branch as a Markdown document.
    Markdown,
}

#[derive(ResponseContent)]
pub enum ExportBody {
    Json(Json<Box<ChatExportDto>>),
    #[oai(content_type = "text/markdown; charset=utf-8")]
    Markdown(PlainText<String>),
}

#[derive(ApiResponse)]
pub enum Exported {
    /// The chat, as a download (`Content-Disposition: attachment`).
    #[oai(status = 200)]
    Ok(ExportBody, #[oai(header = "Content-Disposition")] String),
}

#[derive(ApiResponse)]
pub enum Imported {
    /// The chat was created with its messages.
    #[oai(status = 201)]
    Created(Json<ChatDto>),
}

fn role(r: RoleDto) -> domain::Role {
    match r {
        RoleDto::User => domain::Role::User,
        RoleDto::Assistant => domain::Role::Assistant,
        RoleDto::System => domain::Role::System,
    }
}

fn status(s: MessageStatusDto) -> domain::MessageStatus {
    use domain::MessageStatus as S;
    match s {
        MessageStatusDto::Complete => S::Complete,
        MessageStatusDto::Streaming => S::Streaming,
        MessageStatusDto::Cancelled => S::Cancelled,
        MessageStatusDto::Interrupted => S::Interrupted,
        MessageStatusDto::Failed => S::Failed,
    }
}

/// The export as JSON.
fn export_json(chat: domain::Chat, messages: Vec<domain::Message>) -> ChatExportDto {
    ChatExportDto {
        format: FORMAT.into(),
        version: VERSION,
        exported_at: domain::now().into(),
        chat_id: chat.id,
        user_id: chat.user_id,
        title: chat.title,
        metadata: JsonObject(chat.metadata),
        config: chat.config.into(),
        created_at: chat.created_at.into(),
        active_message_id: chat.active_message_id,
        messages: messages
            .into_iter()
            .map(|m| ExportedMessageDto {
                id: m.id,
                parent_id: m.parent_id,
                role: m.role.into(),
                content: m.content,
                metadata: JsonObject(m.metadata),
                status: m.status.into(),
                usage: match (m.prompt_tokens, m.completion_tokens) {
                    (Some(p), Some(c)) => Some(UsageDto {
                        prompt_tokens: p,
                        completion_tokens: c,
                    }),
                    _ => None,
                },
                created_at: m.created_at.into(),
            })
            .collect(),
    }
}

/// The import checked into a tree to write.
fn plan(state: &AppState, body: ImportChatRequest) -> Result<domain::PlannedChat, ApiError> {
    if let Some(f) = body.format.as_deref().filter(|f| *f != FORMAT) {
        return Err(domain::ValidationError::new(
            "format",
            format!("{f:?} is not a format this server reads; use {FORMAT:?} (or leave it out)"),
            serde_json::json!({"expected": FORMAT}),
        )
        .into());
    }
    if let Some(v) = body.version.filter(|v| *v != VERSION) {
        return Err(domain::ValidationError::new(
            "version",
            format!(
                "version {v} of {FORMAT} is not known here; this server reads version {VERSION}"
            ),
            serde_json::json!({"expected": VERSION}),
        )
        .into());
    }
    let chat = body.chat.into_domain(&state.limits)?;
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        let metadata = m.metadata.map(|m| m.0).unwrap_or_default();
        domain::validate_metadata(&state.limits, &metadata).map_err(|e| {
            domain::ValidationError::new(&format!("messages[{i}].{}", e.field), e.message, e.rule)
        })?;
        messages.push(ImportMessage {
            id: m.id,
            parent_id: m.parent_id,
            role: role(m.role),
            content: m.content,
            metadata,
            status: m.status.map(status),
            created_at: m.created_at.map(|t| t.0),
        });
    }
    Ok(domain::plan_import(
        chat,
        messages,
        body.active_message_id,
        state.limits.max_import_messages,
        state.chat.settings().messages.max_content_chars,
    )?)
}

/// A file name for the download: the title's letters and digits, else the chat id.
fn file_name(chat: &domain::Chat, extension: &str) -> String {
    let stem: String = chat
        .title
        .as_deref()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let stem = if stem.is_empty() {
        format!("chat-{}", chat.id)
    } else {
        stem.chars().take(64).collect()
    };
    format!("attachment; filename=\"{stem}.{extension}\"")
}

/// Export and import of whole chats.
pub struct TransferApi;

#[OpenApi(tag = "ApiTags::Chats")]
impl TransferApi {
    /// Export a chat
    ///
    /// `format=json` (the default): the chat's settings and every message of every branch,
    /// each with its `parent_id`, in the form `POST /api/v1/chats/import` takes back.
    /// `format=markdown`: the active branch as a Markdown document.
    #[oai(
        path = "/api/v1/chats/:chat_id/export",
        method = "get",
        operation_id = "export_chat"
    )]
    async fn export(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        chat_id: Path<Uuid>,
        /// `json` or `markdown`.
        #[oai(default)]
        format: Query<ExportFormat>,
    ) -> Result<Exported, Failure<OnChat>> {
        let scope = auth.0.scope(&state.store);
        let not_found = ApiError::for_chat(chat_id.0);
        let chat = scope.get_chat(chat_id.0).await.map_err(not_found)?;
        match format.0 {
            ExportFormat::Json => {
                let messages = scope
                    .all_messages(chat.id)
                    .await
                    .map_err(ApiError::for_chat(chat_id.0))?;
                let name = file_name(&chat, "json");
                Ok(Exported::Ok(
                    ExportBody::Json(Json(Box::new(export_json(chat, messages)))),
                    name,
                ))
            }
            ExportFormat::Markdown => {
                let all = PageRequest {
                    offset: 0,
                    limit: u64::MAX,
                    order: Order::Asc,
                };
                let branch = scope
                    .list_messages(chat.id, all, BranchView::Active)
                    .await
                    .map_err(ApiError::for_chat(chat_id.0))?;
                let text = domain::branch_markdown(&chat, &branch.items);
                Ok(Exported::Ok(
                    ExportBody::Markdown(PlainText(text)),
                    file_name(&chat, "md"),
                ))
            }
        }
    }

    /// Import a chat
    ///
    /// Creates a chat for `user_id` from an export of this server (any branch structure is
    /// kept; messages get new ids) or from an OpenAI-style `messages` list (one branch).
    /// Checked whole before anything is written: a refused import creates nothing. Bounded
    /// by `--max-import-bytes` and `--max-import-messages`.
    #[oai(
        path = "/api/v1/chats/import",
        method = "post",
        operation_id = "import_chat"
    )]
    async fn import(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        body: Json<ImportChatRequest>,
    ) -> Result<Imported, Failure<WithBody>> {
        let planned = plan(&state, body.0)?;
        auth.0.may_act_for(&planned.chat.user_id)?;
        let (chat, _) = auth.0.scope(&state.store).import_chat(planned).await?;
        Ok(Imported::Created(Json(ChatDto::new(
            auth.0.tenant.as_uuid(),
            chat,
        ))))
    }
}
