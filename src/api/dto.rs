//! Request and response bodies of the REST API, and their conversion to and from the domain.
//!
//! Bounds that are part of the contract are declared here as validators, so they appear in
//! the OpenAPI document and are enforced before a handler runs.

use poem_openapi::types::MaybeUndefined;
use poem_openapi::{Enum, Object, Union};
use uuid::Uuid;

use super::types::{
    JsonObject, MaxTokens, Real, RepeatPenalty, RuledText, SchemaNameRule, Seed, StopList,
    Temperature, Text, Timestamp, TitleRule, TopK, TopP, UserIdRule, Whole,
};
use crate::domain::{self, generation, Limits, Patch, ValidationError};

/// The system prompt and sampling settings of a chat. Every field is optional; an absent
/// field uses the server's default. In a `PATCH`, `null` clears a field.
#[derive(Debug, Clone, Default, Object)]
#[oai(rename = "ChatConfig", nullable_all)]
pub struct ChatConfigDto {
    /// Instructions the model sees before the conversation.
    pub system_prompt: MaybeUndefined<Text>,
    /// Sampling temperature; 0 picks the most likely token every time.
    pub temperature: MaybeUndefined<Real<Temperature>>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    pub top_p: MaybeUndefined<Real<TopP>>,
    /// Keep only the this many most likely tokens.
    pub top_k: MaybeUndefined<Whole<TopK>>,
    /// Longest reply, in tokens.
    pub max_tokens: MaybeUndefined<Whole<MaxTokens>>,
    /// Penalty for repeating recent tokens; 1 means none.
    pub repeat_penalty: MaybeUndefined<Real<RepeatPenalty>>,
    /// Same seed and same input give the same reply.
    pub seed: MaybeUndefined<Seed>,
    /// Up to 4 strings (1–128 characters each) that end the reply; not included in it.
    pub stop: MaybeUndefined<StopList>,
    /// Replies must be JSON, by constrained decoding: any JSON object, or a value valid
    /// against a JSON Schema (as on the OpenAI API). Absent: free text.
    pub response_format: MaybeUndefined<ResponseFormatDto>,
}

/// What replies must be: `{"type": "json_object"}` (any JSON object) or `{"type":
/// "json_schema", "json_schema": {"name", "schema"}}` (a value valid against the schema).
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type", rename = "ResponseFormat")]
pub enum ResponseFormatDto {
    #[oai(mapping = "json_object")]
    JsonObject(JsonObjectFormatDto),
    #[oai(mapping = "json_schema")]
    JsonSchema(JsonSchemaFormatDto),
}

/// Any JSON object.
#[derive(Debug, Clone, Object)]
#[oai(rename = "JsonObjectFormat")]
pub struct JsonObjectFormatDto {}

/// A value valid against a JSON Schema.
#[derive(Debug, Clone, Object)]
#[oai(rename = "JsonSchemaFormat")]
pub struct JsonSchemaFormatDto {
    pub json_schema: JsonSchemaSpecDto,
}

/// A named JSON Schema.
#[derive(Debug, Clone, Object)]
#[oai(rename = "JsonSchemaSpec")]
pub struct JsonSchemaSpecDto {
    pub name: RuledText<SchemaNameRule>,
    /// The JSON Schema replies must match.
    pub schema: JsonObject,
}

impl ResponseFormatDto {
    fn into_domain(self) -> Result<domain::ResponseFormat, ValidationError> {
        match self {
            ResponseFormatDto::JsonObject(_) => Ok(domain::ResponseFormat::JsonObject),
            ResponseFormatDto::JsonSchema(f) => {
                let js = f.json_schema;
                domain::validate_schema_name(
                    "config.response_format.json_schema.name",
                    &js.name.0,
                )?;
                Ok(domain::ResponseFormat::JsonSchema {
                    json_schema: domain::JsonSchemaSpec {
                        name: js.name.0,
                        schema: serde_json::Value::Object(js.schema.0),
                    },
                })
            }
        }
    }
}

impl From<domain::ResponseFormat> for ResponseFormatDto {
    fn from(f: domain::ResponseFormat) -> Self {
        match f {
            domain::ResponseFormat::JsonObject => {
                ResponseFormatDto::JsonObject(JsonObjectFormatDto {})
            }
            domain::ResponseFormat::JsonSchema { json_schema } => {
                ResponseFormatDto::JsonSchema(JsonSchemaFormatDto {
                    json_schema: JsonSchemaSpecDto {
                        name: RuledText::new(json_schema.name),
                        schema: JsonObject(match json_schema.schema {
                            serde_json::Value::Object(m) => m,
                            _ => Default::default(),
                        }),
                    },
                })
            }
        }
    }
}

fn patch_with<T, U>(m: MaybeUndefined<T>, f: impl FnOnce(T) -> U) -> Patch<U> {
    match m {
        MaybeUndefined::Undefined => Patch::Keep,
        MaybeUndefined::Null => Patch::Clear,
        MaybeUndefined::Value(v) => Patch::Set(f(v)),
    }
}

fn undefined_if_none<T>(o: Option<T>) -> MaybeUndefined<T> {
    match o {
        Some(v) => MaybeUndefined::Value(v),
        None => MaybeUndefined::Undefined,
    }
}

impl ChatConfigDto {
    /// The change this body asks for, checked against the operator's limits.
    pub fn into_patch(self, limits: &Limits) -> Result<domain::ChatConfigPatch, ValidationError> {
        if let MaybeUndefined::Value(p) = &self.system_prompt {
            crate::domain::reject_nul("config.system_prompt", &p.0)?;
            let n = p.0.chars().count();
            if n > limits.max_system_prompt_chars {
                return Err(ValidationError::new(
                    "config.system_prompt",
                    format!(
                        "is {n} characters long; at most {} allowed",
                        limits.max_system_prompt_chars
                    ),
                    serde_json::json!({"max_length": limits.max_system_prompt_chars}),
                ));
            }
        }
        if let MaybeUndefined::Value(stops) = &self.stop {
            generation::check_stop("config.stop", &stops.0)?;
        }
        let response_format = match self.response_format {
            MaybeUndefined::Undefined => Patch::Keep,
            MaybeUndefined::Null => Patch::Clear,
            MaybeUndefined::Value(f) => Patch::Set(f.into_domain()?),
        };
        Ok(domain::ChatConfigPatch {
            response_format,
            system_prompt: patch_with(self.system_prompt, |t| t.0),
            temperature: patch_with(self.temperature, |v| v.0),
            top_p: patch_with(self.top_p, |v| v.0),
            top_k: patch_with(self.top_k, |v| v.0),
            max_tokens: patch_with(self.max_tokens, |v| v.0),
            repeat_penalty: patch_with(self.repeat_penalty, |v| v.0),
            seed: patch_with(self.seed, |v| v.0),
            stop: patch_with(self.stop, |v| v.0),
        })
    }

    /// A new chat's config: `null` and absent both mean "server default".
    pub fn into_config(self, limits: &Limits) -> Result<domain::ChatConfig, ValidationError> {
        let mut c = domain::ChatConfig::default();
        c.apply(self.into_patch(limits)?);
        Ok(c)
    }
}

impl From<domain::ChatConfig> for ChatConfigDto {
    fn from(c: domain::ChatConfig) -> Self {
        ChatConfigDto {
            system_prompt: undefined_if_none(c.system_prompt.map(Text)),
            temperature: undefined_if_none(c.temperature.map(Real::new)),
            top_p: undefined_if_none(c.top_p.map(Real::new)),
            top_k: undefined_if_none(c.top_k.map(Whole::new)),
            max_tokens: undefined_if_none(c.max_tokens.map(Whole::new)),
            repeat_penalty: undefined_if_none(c.repeat_penalty.map(Real::new)),
            seed: undefined_if_none(c.seed.map(Seed)),
            stop: undefined_if_none(c.stop.map(StopList)),
            response_format: undefined_if_none(c.response_format.map(ResponseFormatDto::from)),
        }
    }
}

/// Body of `POST /api/v1/chats/`.
#[derive(Debug, Object)]
#[oai(rename = "CreateChatRequest")]
pub struct CreateChatRequest {
    /// Your own id for the user (1–128 characters, no whitespace, control characters or
    /// `/`); the user is created on first use.
    pub user_id: RuledText<UserIdRule>,
    /// At most 256 characters, no control characters.
    #[oai(nullable)]
    pub title: Option<RuledText<TitleRule>>,
    /// Any JSON object; stored and returned as sent.
    #[oai(nullable)]
    pub metadata: Option<JsonObject>,
    #[oai(nullable)]
    pub config: Option<ChatConfigDto>,
}

impl CreateChatRequest {
    pub fn into_domain(self, limits: &Limits) -> Result<domain::NewChat, ValidationError> {
        domain::validate_user_id("user_id", &self.user_id.0)?;
        if let Some(t) = &self.title {
            domain::validate_title(&t.0)?;
        }
        let metadata = self.metadata.map(|m| m.0).unwrap_or_default();
        domain::validate_metadata(limits, &metadata)?;
        let config = match self.config {
            Some(c) => c.into_config(limits)?,
            None => domain::ChatConfig::default(),
        };
        Ok(domain::NewChat {
            user_id: self.user_id.0,
            title: self.title.map(|t| t.0),
            metadata,
            config,
        })
    }
}

/// Body of `PATCH /api/v1/chats/{chat_id}`. Absent fields stay as they are.
#[derive(Debug, Object)]
#[oai(rename = "UpdateChatRequest")]
pub struct UpdateChatRequest {
    /// New title; `null` removes it.
    #[oai(nullable)]
    pub title: MaybeUndefined<RuledText<TitleRule>>,
    /// Replaces the whole metadata object (`null`: left as it is).
    #[oai(nullable)]
    pub metadata: Option<JsonObject>,
    /// Merged field by field into the chat's config; `null` in a field clears it.
    #[oai(nullable)]
    pub config: Option<ChatConfigDto>,
}

impl UpdateChatRequest {
    pub fn into_domain(self, limits: &Limits) -> Result<domain::ChatUpdate, ValidationError> {
        if let MaybeUndefined::Value(t) = &self.title {
            domain::validate_title(&t.0)?;
        }
        let metadata = self.metadata.map(|m| m.0);
        if let Some(m) = &metadata {
            domain::validate_metadata(limits, m)?;
        }
        let config = self.config.map(|c| c.into_patch(limits)).transpose()?;
        Ok(domain::ChatUpdate {
            title: patch_with(self.title, |t| t.0),
            metadata,
            config,
        })
    }
}

/// A chat.
#[derive(Debug, Object)]
#[oai(rename = "Chat")]
pub struct ChatDto {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: String,
    /// Null when the chat has none.
    #[oai(nullable)]
    pub title: Option<String>,
    pub metadata: JsonObject,
    pub config: ChatConfigDto,
    /// Number of messages on the chat's active branch (what it shows and answers from).
    pub message_count: i64,
    /// The active branch's last message; null while the chat is empty. Regenerating or
    /// editing makes a new branch active; `PUT /api/v1/chats/{chat_id}/active` switches.
    #[oai(nullable)]
    pub active_message_id: Option<Uuid>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When the chat last changed or received a message.
    pub last_activity_at: Timestamp,
    /// Where a search (`q`) matched this chat; only in search results.
    #[oai(rename = "match", skip_serializing_if_is_none)]
    pub search_match: Option<ChatMatchDto>,
}

/// Where a search matched a chat.
#[derive(Debug, Object)]
#[oai(rename = "ChatMatch")]
pub struct ChatMatchDto {
    /// The newest matching message; null when only the title matches.
    #[oai(nullable)]
    pub message_id: Option<Uuid>,
    /// A short passage of that message (or the title) around the matched words; plain text.
    pub snippet: String,
    /// The matched words in `snippet`: `[start, end)` offsets in Unicode characters.
    pub highlights: Vec<[u64; 2]>,
}

impl ChatDto {
    /// A search result: the chat and where it matched.
    pub fn matched(tenant_id: Uuid, m: crate::store::ChatMatch) -> Self {
        let search_match = Some(ChatMatchDto {
            message_id: m.message_id,
            snippet: m.snippet,
            highlights: m
                .highlights
                .into_iter()
                .map(|(a, b)| [a as u64, b as u64])
                .collect(),
        });
        ChatDto {
            search_match,
            ..ChatDto::new(tenant_id, m.chat)
        }
    }

    pub fn new(tenant_id: Uuid, c: domain::Chat) -> Self {
        ChatDto {
            id: c.id,
            tenant_id,
            user_id: c.user_id,
            title: c.title,
            metadata: JsonObject(c.metadata),
            config: c.config.into(),
            message_count: c.message_count,
            active_message_id: c.active_message_id,
            created_at: c.created_at.into(),
            updated_at: c.updated_at.into(),
            last_activity_at: c.last_activity_at.into(),
            search_match: None,
        }
    }
}

/// One page of a user's chats, newest first.
#[derive(Debug, Object)]
#[oai(rename = "ChatList")]
pub struct ChatListDto {
    pub chats: Vec<ChatDto>,
    /// All chats of the user (with `q`: all that match).
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// True when more chats follow this page.
    pub has_more: bool,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename = "Role", rename_all = "lowercase")]
pub enum RoleDto {
    User,
    Assistant,
    System,
}

impl From<domain::Role> for RoleDto {
    fn from(r: domain::Role) -> Self {
        match r {
            domain::Role::User => RoleDto::User,
            domain::Role::Assistant => RoleDto::Assistant,
            domain::Role::System => RoleDto::System,
        }
    }
}

/// Where a message is in its life: `streaming` while the reply is generated, then
/// `complete`, `cancelled`, `failed`, or `interrupted` (the server stopped mid-reply).
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename = "MessageStatus", rename_all = "lowercase")]
pub enum MessageStatusDto {
    Complete,
    Streaming,
    Cancelled,
    Interrupted,
    Failed,
}

impl From<domain::MessageStatus> for MessageStatusDto {
    fn from(s: domain::MessageStatus) -> Self {
        use domain::MessageStatus as S;
        match s {
            S::Complete => MessageStatusDto::Complete,
            S::Streaming => MessageStatusDto::Streaming,
            S::Cancelled => MessageStatusDto::Cancelled,
            S::Interrupted => MessageStatusDto::Interrupted,
            S::Failed => MessageStatusDto::Failed,
        }
    }
}

/// Tokens a reply took.
#[derive(Debug, Object)]
#[oai(rename = "Usage")]
pub struct UsageDto {
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
}

/// A message of a chat.
#[derive(Debug, Object)]
#[oai(rename = "Message")]
pub struct MessageDto {
    pub id: Uuid,
    pub chat_id: Uuid,
    /// Order of writing in the chat (all branches), from 1.
    pub seq: i64,
    /// The message this one follows; null for a first message (and its edits). Messages
    /// with the same parent are alternatives (regenerated replies, edited messages).
    #[oai(nullable)]
    pub parent_id: Option<Uuid>,
    /// Listings of the active branch only: the ids of the messages with the same parent
    /// (itself included, in order of writing) — more than one after a regenerate or an
    /// edit; `PUT /api/v1/chats/{chat_id}/active` with one of them switches to it.
    #[oai(skip_serializing_if_is_none)]
    pub siblings: Option<Vec<Uuid>>,
    pub role: RoleDto,
    pub content: String,
    pub metadata: JsonObject,
    pub status: MessageStatusDto,
    /// Token counts of an assistant reply; null for other messages.
    #[oai(nullable)]
    pub usage: Option<UsageDto>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl From<domain::Message> for MessageDto {
    fn from(m: domain::Message) -> Self {
        let usage = match (m.prompt_tokens, m.completion_tokens) {
            (Some(p), Some(c)) => Some(UsageDto {
                prompt_tokens: p,
                completion_tokens: c,
            }),
            _ => None,
        };
        MessageDto {
            id: m.id,
            chat_id: m.chat_id,
            seq: m.seq,
            parent_id: m.parent_id,
            siblings: None,
            role: m.role.into(),
            content: m.content,
            metadata: JsonObject(m.metadata),
            status: m.status.into(),
            usage,
            created_at: m.created_at.into(),
            updated_at: m.updated_at.into(),
        }
    }
}

/// One page of a chat's messages.
#[derive(Debug, Object)]
#[oai(rename = "MessageList")]
pub struct MessageListDto {
    pub messages: Vec<MessageDto>,
    /// Messages of the branch listed (the active one, or all of the chat's).
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// True when more messages follow this page.
    pub has_more: bool,
}

/// Sort order of a listing.
#[derive(Debug, Clone, Copy, Default, Enum)]
#[oai(rename = "Order", rename_all = "lowercase")]
pub enum OrderDto {
    #[default]
    Asc,
    Desc,
}

/// Which messages a chat's listing covers.
#[derive(Debug, Clone, Copy, Default, Enum)]
#[oai(rename = "Branch", rename_all = "lowercase")]
pub enum BranchDto {
    /// The active branch, in conversation order.
    #[default]
    Active,
    /// Every message of every branch, in order of writing (`seq`).
    All,
}

impl From<BranchDto> for domain::BranchView {
    fn from(b: BranchDto) -> Self {
        match b {
            BranchDto::Active => domain::BranchView::Active,
            BranchDto::All => domain::BranchView::All,
        }
    }
}

/// `PUT /api/v1/chats/{chat_id}/active`.
#[derive(Debug, Object)]
#[oai(rename = "SetActiveMessage")]
pub struct SetActiveRequest {
    /// A message of the chat: the newest leaf under it becomes the active one.
    pub message_id: Uuid,
}

impl From<OrderDto> for domain::Order {
    fn from(o: OrderDto) -> Self {
        match o {
            OrderDto::Asc => domain::Order::Asc,
            OrderDto::Desc => domain::Order::Desc,
        }
    }
}

/// `GET /healthz`.
#[derive(Debug, Object)]
#[oai(rename = "Health")]
pub struct HealthDto {
    /// Always `ok` when the process answers.
    pub status: String,
    pub version: String,
}

/// `GET /readyz`.
#[derive(Debug, Object)]
#[oai(rename = "Ready")]
pub struct ReadyDto {
    /// `ready`; `degraded` when a replica of a cluster cannot reach Redis (it still serves,
    /// alone: see `cluster_detail`).
    pub status: String,
    /// `ok` when the database answers.
    pub database: String,
    /// `ready` when the model is loaded (`not_configured` when the server runs without one).
    pub model: String,
    /// The loaded model's name.
    #[oai(nullable)]
    pub model_name: Option<String>,
    /// What the loaded model is.
    #[oai(nullable)]
    pub model_info: Option<ModelInfoDto>,
    /// `off` (one server), `ok` (a replica in touch with Redis) or `degraded`.
    pub cluster: String,
    /// Why the cluster is degraded.
    #[oai(nullable)]
    pub cluster_detail: Option<String>,
}

/// Facts about the loaded model file.
#[derive(Object, Debug, Clone)]
pub struct ModelInfoDto {
    /// GGUF `general.architecture`: `llama`, …
    pub architecture: String,
    /// `Q4_K_M`, `Q8_0`, … as llama.cpp names the file's quantization.
    pub quantization: String,
    /// Values in the model's tensors.
    pub parameters: u64,
    /// Context the server uses, in tokens.
    pub context_length: u64,
}
