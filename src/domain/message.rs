//! Message roles and lifecycle states.

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    System,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "system" => Some(Role::System),
            _ => None,
        }
    }
}

/// Where a message is in its life. User messages are `complete` when saved; assistant
/// replies start `streaming` and end in one of the other states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Complete,
    Streaming,
    Cancelled,
    /// The server stopped (crash or restart) while the reply was streaming.
    Interrupted,
    Failed,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Complete => "complete",
            MessageStatus::Streaming => "streaming",
            MessageStatus::Cancelled => "cancelled",
            MessageStatus::Interrupted => "interrupted",
            MessageStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<MessageStatus> {
        match s {
            "complete" => Some(MessageStatus::Complete),
            "streaming" => Some(MessageStatus::Streaming),
            "cancelled" => Some(MessageStatus::Cancelled),
            "interrupted" => Some(MessageStatus::Interrupted),
            "failed" => Some(MessageStatus::Failed),
            _ => None,
        }
    }
}
