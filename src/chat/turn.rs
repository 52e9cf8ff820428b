//! What a client asks of a chat's message tree — a new message, an edited one, a new reply —
//! checked against the stored tree before anything is queued or saved: which user message
//! is saved where, and which one the reply answers.

use serde_json::{json, Value};
use uuid::Uuid;

pub use super::protocol::Turn;
use super::ChatError;
use crate::domain::{Chat, MessageStatus, NewMessage, Parent, Role, ValidationError};
use crate::store::{StoreError, TenantScope};

/// A turn placed in the tree.
#[derive(Debug)]
pub(super) struct Placed {
    /// The user message to save (and where), unless the reply answers a stored one.
    pub save: Option<NewMessage>,
    /// The stored user message the reply answers (regenerate).
    pub answers: Option<Uuid>,
    /// Where the history before the turn's user message ends (`None`: no history): what
    /// the budget estimate builds the prompt from.
    pub history_leaf: Option<Uuid>,
}

fn invalid(message: String, details: Value) -> ChatError {
    ChatError::Invalid(ValidationError::new("message_id", message, details))
}

fn store_error(chat_id: Uuid) -> impl Fn(StoreError) -> ChatError {
    move |e| match e {
        StoreError::NotFound => ChatError::ChatNotFound(chat_id),
        other => other.into(),
    }
}

/// Checks `turn` against `chat`'s tree.
pub(super) async fn place(
    scope: &TenantScope<'_>,
    chat: &Chat,
    turn: Turn,
) -> Result<Placed, ChatError> {
    let user_message = |content, metadata, parent| NewMessage {
        role: Role::User,
        content,
        metadata,
        status: MessageStatus::Complete,
        parent,
    };
    match turn {
        Turn::Message { content, metadata } => Ok(Placed {
            save: Some(user_message(content, metadata, Parent::Active)),
            answers: None,
            history_leaf: chat.active_message_id,
        }),
        Turn::Edit {
            message_id,
            content,
            metadata,
        } => {
            let target = scope
                .get_message(chat.id, message_id)
                .await
                .map_err(store_error(chat.id))?;
            if target.role != Role::User {
                return Err(invalid(
                    format!(
                        "message {message_id} is an {} message; only user messages can be \
                         edited (regenerate replaces a reply)",
                        target.role.as_str()
                    ),
                    json!({"message_id": message_id, "role": target.role.as_str(), "expected": "user"}),
                ));
            }
            Ok(Placed {
                save: Some(user_message(
                    content,
                    metadata,
                    Parent::Of(target.parent_id),
                )),
                answers: None,
                history_leaf: target.parent_id,
            })
        }
        Turn::Regenerate { message_id } => {
            let target_id = match message_id.or(chat.active_message_id) {
                Some(id) => id,
                None => {
                    return Err(invalid(
                        "the chat has no messages yet: send one first".into(),
                        json!({"message_count": 0}),
                    ))
                }
            };
            let target = scope
                .get_message(chat.id, target_id)
                .await
                .map_err(store_error(chat.id))?;
            let answers = match (target.role, message_id) {
                // The active leaf is a user message whose reply never started: answer it.
                (Role::User, None) => target.id,
                (Role::Assistant, _) => match target.parent_id {
                    Some(p) => p,
                    None => {
                        return Err(invalid(
                            format!("message {target_id} answers no user message"),
                            json!({"message_id": target_id}),
                        ))
                    }
                },
                (role, _) => {
                    return Err(invalid(
                        format!(
                            "message {target_id} is a {} message; name the assistant reply \
                             to regenerate",
                            role.as_str()
                        ),
                        json!({"message_id": target_id, "role": role.as_str(), "expected": "assistant"}),
                    ))
                }
            };
            let question = scope
                .get_message(chat.id, answers)
                .await
                .map_err(store_error(chat.id))?;
            if question.role != Role::User {
                return Err(invalid(
                    format!("message {target_id} does not follow a user message"),
                    json!({"message_id": target_id, "parent_role": question.role.as_str()}),
                ));
            }
            Ok(Placed {
                save: None,
                answers: Some(answers),
                history_leaf: Some(answers),
            })
        }
    }
}
