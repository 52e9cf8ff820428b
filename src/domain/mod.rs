//! The typed domain: chats, messages, their settings and the paging rules.
//!
//! Raw input becomes one of these types once, at the edge (the API layer); storage and, later,
//! the engine accept only these, so a value that got this far is known to be valid.

mod audit;
mod config;
pub mod generation;
mod message;
mod page;
mod quota;
mod transfer;

pub use audit::{Actor, AuditAction};
pub use confab_protocol::limits::{
    reject_nul, validate_metadata, validate_title, validate_user_id, Limits, ValidationError,
};
pub use config::{
    validate_schema_name, ChatConfig, ChatConfigPatch, JsonSchemaSpec, Patch, ResponseFormat,
    SCHEMA_NAME_PATTERN,
};
pub use message::{MessageStatus, Role};
pub use page::{Order, Page, PageRequest};
pub use quota::{
    usage_range, BudgetPeriod, TenantLimits, TenantLimitsPatch, TokenBudgets, TokenBudgetsPatch,
};
pub use transfer::{branch_markdown, plan_import, ImportMessage, PlannedChat, PlannedMessage};

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A chat as stored: who owns it, how the model should answer in it, and how busy it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    pub id: Uuid,
    /// The client's own id of the user who owns the chat (unique within the tenant).
    pub user_id: String,
    pub title: Option<String>,
    /// Free-form client data; always a JSON object.
    pub metadata: Map<String, Value>,
    pub config: ChatConfig,
    /// Messages on the active branch: what the chat shows and answers from.
    pub message_count: i64,
    /// The active branch's last message (`None` while the chat is empty).
    pub active_message_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the chat last changed or received a message.
    pub last_activity_at: DateTime<Utc>,
}

/// One stored message of a chat.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: Uuid,
    pub chat_id: Uuid,
    /// Order of writing in the chat (all branches), from 1; stable even for equal timestamps.
    pub seq: i64,
    /// The message this one follows (`None` for a first message and its edits): messages
    /// form a tree, and regenerating or editing adds a sibling.
    pub parent_id: Option<Uuid>,
    /// Position in its branch, from 1.
    pub depth: i64,
    pub role: Role,
    pub content: String,
    pub metadata: Map<String, Value>,
    pub status: MessageStatus,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a caller supplies to create a chat (already validated).
#[derive(Debug, Clone, Default)]
pub struct NewChat {
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: Map<String, Value>,
    pub config: ChatConfig,
}

/// A change to a chat; absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct ChatUpdate {
    pub title: Patch<String>,
    /// Replaces the whole metadata object when present.
    pub metadata: Option<Map<String, Value>>,
    /// Merged field by field into the stored config.
    pub config: Option<ChatConfigPatch>,
}

impl ChatUpdate {
    pub fn is_empty(&self) -> bool {
        matches!(self.title, Patch::Keep) && self.metadata.is_none() && self.config.is_none()
    }
}

/// What a caller supplies to append a message to a chat.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub role: Role,
    pub content: String,
    pub metadata: Map<String, Value>,
    pub status: MessageStatus,
    /// Where in the chat's tree it goes.
    pub parent: Parent,
}

/// Where a new message goes in a chat's tree. It always becomes the active leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// After the active leaf: the usual next message.
    Active,
    /// Under this message of the chat (`None`: a new first message), beside its other
    /// children: a regenerated reply, an edited message.
    Of(Option<Uuid>),
}

/// Which messages of a chat a listing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BranchView {
    /// The active branch, first message to active leaf.
    #[default]
    Active,
    /// Every message of every branch, in order of writing.
    All,
}

/// The current time, cut to milliseconds: what both databases store and return unchanged,
/// so a value read back equals the value written.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}
