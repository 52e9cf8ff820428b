//! Whole chats in and out: every message of a chat for an export, and an import written in
//! one transaction (a chat appears with all its messages or not at all).

use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, TransactionTrait,
};
use uuid::Uuid;

use super::chats::{chat_from_row, config_json, ensure_user_in, find_chat_in};
use super::entity::{chat, message};
use super::json::encode_object;
use super::messages::message_from_row;
use super::{StoreError, TenantScope};
use crate::domain::{now, Chat, Message, PlannedChat};

/// Rows per INSERT: 15 columns each stays far below SQLite's bound on bound values.
const INSERT_CHUNK: usize = 500;

impl TenantScope<'_> {
    /// Every message of a chat, all branches, in order of writing.
    pub async fn all_messages(&self, chat_id: Uuid) -> Result<Vec<Message>, StoreError> {
        find_chat_in(self.db, &self.owner(), chat_id).await?;
        message::Entity::find()
            .filter(message::Column::TenantId.eq(self.tenant))
            .filter(message::Column::ChatId.eq(chat_id))
            .order_by_asc(message::Column::Seq)
            .all(self.db)
            .await?
            .into_iter()
            .map(message_from_row)
            .collect()
    }

    /// Creates a chat with its whole message tree (checked by `domain::plan_import`:
    /// parents come before their children). Returns the chat and whether its user is new.
    pub async fn import_chat(&self, plan: PlannedChat) -> Result<(Chat, bool), StoreError> {
        if self.user.is_some_and(|u| u != plan.chat.user_id) {
            return Err(StoreError::Invalid(format!(
                "this token acts for user {:?} only",
                self.user.unwrap_or_default()
            )));
        }
        let tenant = self.tenant;
        let owner = self.owner();
        let config = config_json(&plan.chat.config)?;
        self.db
            .transaction::<_, (Chat, bool), StoreError>(|txn| {
                Box::pin(async move {
                    let created_user = ensure_user_in(txn, tenant, &plan.chat.user_id).await?;
                    let ts = now();
                    let chat_id = Uuid::now_v7();
                    let ids: Vec<Uuid> = plan.messages.iter().map(|_| Uuid::now_v7()).collect();
                    let active = plan.active.map(|i| ids[i]);
                    let count = plan.active.map_or(0, |i| plan.messages[i].depth);
                    chat::Entity::insert(chat::ActiveModel {
                        id: Set(chat_id),
                        tenant_id: Set(tenant),
                        user_id: Set(plan.chat.user_id),
                        title: Set(plan.chat.title),
                        metadata: Set(encode_object(&plan.chat.metadata)),
                        config: Set(config),
                        message_count: Set(count),
                        active_message_id: Set(active),
                        last_seq: Set(ids.len() as i64),
                        created_at: Set(ts),
                        updated_at: Set(ts),
                        last_activity_at: Set(ts),
                    })
                    .exec_without_returning(txn)
                    .await?;
                    let rows: Vec<message::ActiveModel> = plan
                        .messages
                        .into_iter()
                        .enumerate()
                        .map(|(i, m)| {
                            let at = m.created_at.unwrap_or(ts);
                            message::ActiveModel {
                                id: Set(ids[i]),
                                tenant_id: Set(tenant),
                                chat_id: Set(chat_id),
                                seq: Set(i as i64 + 1),
                                role: Set(m.role.as_str().to_string()),
                                content: Set(m.content),
                                metadata: Set(encode_object(&m.metadata)),
                                status: Set(m.status.as_str().to_string()),
                                prompt_tokens: Set(None),
                                completion_tokens: Set(None),
                                created_at: Set(at),
                                updated_at: Set(at),
                                replica_id: Set(None),
                                parent_id: Set(m.parent.map(|p| ids[p])),
                                depth: Set(m.depth),
                            }
                        })
                        .collect();
                    let mut rows = rows.into_iter().peekable();
                    while rows.peek().is_some() {
                        let chunk: Vec<_> = rows.by_ref().take(INSERT_CHUNK).collect();
                        message::Entity::insert_many(chunk)
                            .exec_without_returning(txn)
                            .await?;
                    }
                    let chat = chat_from_row(find_chat_in(txn, &owner, chat_id).await?)?;
                    Ok((chat, created_user))
                })
            })
            .await
            .map_err(StoreError::from)
    }
}
