//! Messages of one tenant's chats.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::chats::find_chat_in;
use super::entity::{chat, message};
use super::json::{decode_object, encode_object};
use super::{StoreError, TenantScope};
use crate::domain::{now, Message, MessageStatus, NewMessage, Order, Page, PageRequest, Role};

fn message_from_row(m: message::Model) -> Result<Message, StoreError> {
    let role = Role::parse(&m.role)
        .ok_or_else(|| StoreError::Corrupt(format!("message {} has role {:?}", m.id, m.role)))?;
    let status = MessageStatus::parse(&m.status).ok_or_else(|| {
        StoreError::Corrupt(format!("message {} has status {:?}", m.id, m.status))
    })?;
    let metadata = decode_object(&m.metadata, &format_args!("message {} metadata", m.id))?;
    Ok(Message {
        id: m.id,
        chat_id: m.chat_id,
        seq: m.seq,
        role,
        content: m.content,
        metadata,
        status,
        prompt_tokens: m.prompt_tokens,
        completion_tokens: m.completion_tokens,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

impl TenantScope<'_> {
    /// A window of a chat's messages in sequence order.
    pub async fn list_messages(
        &self,
        chat_id: Uuid,
        page: PageRequest,
    ) -> Result<Page<Message>, StoreError> {
        find_chat_in(self.db, &self.owner(), chat_id).await?;
        let base = message::Entity::find()
            .filter(message::Column::TenantId.eq(self.tenant))
            .filter(message::Column::ChatId.eq(chat_id));
        let total = base.clone().count(self.db).await?;
        let ordered = match page.order {
            Order::Asc => base.order_by_asc(message::Column::Seq),
            Order::Desc => base.order_by_desc(message::Column::Seq),
        };
        let rows = ordered
            .offset(page.offset)
            .limit(page.limit)
            .all(self.db)
            .await?;
        let items = rows
            .into_iter()
            .map(message_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page {
            items,
            total,
            offset: page.offset,
            limit: page.limit,
        })
    }

    /// Appends a message to a chat, giving it the chat's next sequence number.
    ///
    /// The counter update comes first in the transaction: it takes the write lock (SQLite) or
    /// the row lock (PostgreSQL) at once, so concurrent appends queue up instead of failing.
    pub async fn append_message(
        &self,
        chat_id: Uuid,
        new: NewMessage,
    ) -> Result<Message, StoreError> {
        let tenant = self.tenant;
        let owner = self.owner();
        // A streaming reply records the replica that generates it.
        let replica = (new.status == MessageStatus::Streaming)
            .then(|| self.replica.map(str::to_string))
            .flatten();
        self.db
            .transaction::<_, Message, StoreError>(|txn| {
                Box::pin(async move {
                    let ts = now();
                    let res = chat::Entity::update_many()
                        .col_expr(
                            chat::Column::MessageCount,
                            Expr::col(chat::Column::MessageCount).add(1),
                        )
                        .col_expr(chat::Column::LastActivityAt, Expr::value(ts))
                        .filter(chat::Column::Id.eq(chat_id))
                        .filter(owner.of_chat())
                        .exec(txn)
                        .await?;
                    if res.rows_affected == 0 {
                        return Err(StoreError::NotFound);
                    }
                    let seq = find_chat_in(txn, &owner, chat_id).await?.message_count;
                    let row = message::ActiveModel {
                        id: Set(Uuid::now_v7()),
                        tenant_id: Set(tenant),
                        chat_id: Set(chat_id),
                        seq: Set(seq),
                        role: Set(new.role.as_str().to_string()),
                        content: Set(new.content),
                        metadata: Set(encode_object(&new.metadata)),
                        status: Set(new.status.as_str().to_string()),
                        prompt_tokens: Set(None),
                        completion_tokens: Set(None),
                        created_at: Set(ts),
                        updated_at: Set(ts),
                        replica_id: Set(replica),
                    };
                    let id = message::Entity::insert(row).exec(txn).await?.last_insert_id;
                    let m = message::Entity::find_by_id(id)
                        .filter(message::Column::TenantId.eq(tenant))
                        .one(txn)
                        .await?
                        .ok_or(StoreError::NotFound)?;
                    message_from_row(m)
                })
            })
            .await
            .map_err(StoreError::from)
    }

    /// The last `limit` messages of a chat, oldest first: the history a prompt is built from.
    pub async fn recent_messages(
        &self,
        chat_id: Uuid,
        limit: u64,
    ) -> Result<Vec<Message>, StoreError> {
        let mut rows = message::Entity::find()
            .filter(message::Column::TenantId.eq(self.tenant))
            .filter(message::Column::ChatId.eq(chat_id))
            .order_by_desc(message::Column::Seq)
            .limit(limit)
            .all(self.db)
            .await?;
        rows.reverse();
        rows.into_iter().map(message_from_row).collect()
    }

    /// One message of a chat.
    pub async fn get_message(
        &self,
        chat_id: Uuid,
        message_id: Uuid,
    ) -> Result<Message, StoreError> {
        let row = message::Entity::find_by_id(message_id)
            .filter(message::Column::TenantId.eq(self.tenant))
            .filter(message::Column::ChatId.eq(chat_id))
            .one(self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        message_from_row(row)
    }

    /// Saves a reply's text so far, or its final state: text, status and token counts.
    /// `NotFound` when the message (or its chat) is gone.
    pub async fn update_reply(
        &self,
        message_id: Uuid,
        update: ReplyUpdate,
    ) -> Result<(), StoreError> {
        let mut q = message::Entity::update_many()
            .col_expr(message::Column::Content, Expr::value(update.content))
            .col_expr(
                message::Column::Status,
                Expr::value(update.status.as_str().to_string()),
            )
            .col_expr(message::Column::UpdatedAt, Expr::value(now()));
        if let Some((prompt, completion)) = update.usage {
            q = q
                .col_expr(message::Column::PromptTokens, Expr::value(prompt))
                .col_expr(message::Column::CompletionTokens, Expr::value(completion));
        }
        let res = q
            .filter(message::Column::TenantId.eq(self.tenant))
            .filter(message::Column::Id.eq(message_id))
            .exec(self.db)
            .await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}

/// The state of a reply to save.
#[derive(Debug, Clone)]
pub struct ReplyUpdate {
    pub content: String,
    pub status: MessageStatus,
    /// Prompt and completion tokens, once known.
    pub usage: Option<(i32, i32)>,
}

impl super::Store {
    /// Marks replies that were streaming when the server stopped as `interrupted` (their
    /// text, saved as it grew, stays). Run at start-up, before anything can stream, by a
    /// server that is the only one on its database.
    pub async fn interrupt_streaming(&self) -> Result<u64, StoreError> {
        self.interrupt_where(message::Column::Status.eq(MessageStatus::Streaming.as_str()))
            .await
    }

    /// Marks the unfinished replies of one replica `interrupted` (cluster mode: its own at
    /// start-up, or a dead one's).
    pub async fn interrupt_streaming_of(&self, replica: &str) -> Result<u64, StoreError> {
        self.interrupt_where(
            message::Column::Status
                .eq(MessageStatus::Streaming.as_str())
                .and(message::Column::ReplicaId.eq(replica)),
        )
        .await
    }

    async fn interrupt_where(
        &self,
        cond: sea_orm::sea_query::SimpleExpr,
    ) -> Result<u64, StoreError> {
        let res = message::Entity::update_many()
            .col_expr(
                message::Column::Status,
                Expr::value(MessageStatus::Interrupted.as_str().to_string()),
            )
            .col_expr(message::Column::UpdatedAt, Expr::value(now()))
            .filter(cond)
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected)
    }

    /// The replicas that have replies streaming, by the database.
    pub async fn streaming_replicas(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<Option<String>> = message::Entity::find()
            .select_only()
            .column(message::Column::ReplicaId)
            .distinct()
            .filter(message::Column::Status.eq(MessageStatus::Streaming.as_str()))
            .filter(message::Column::ReplicaId.is_not_null())
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().flatten().collect())
    }
}
