//! Messages of one tenant's chats.

use sea_orm::sea_query::Expr;
use std::collections::HashMap;

use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use uuid::Uuid;

use super::chats::{chat_from_row, find_chat_in, lock_chat_in};
use super::entity::{chat, message};
use super::json::{decode_object, encode_object};
use super::{StoreError, TenantScope};
use crate::domain::{
    now, BranchView, Chat, Message, MessageStatus, NewMessage, Order, Page, PageRequest, Parent,
    Role,
};

/// The depths (from 1) a page of a branch of `total` messages covers, first to last; empty
/// (`last < first`) past its end.
fn window(total: u64, page: PageRequest) -> (u64, u64) {
    let n = total.saturating_sub(page.offset).min(page.limit);
    match page.order {
        Order::Asc => (page.offset + 1, page.offset + n),
        Order::Desc => {
            let last = total.saturating_sub(page.offset);
            (last + 1 - n, last)
        }
    }
}

pub(super) fn message_from_row(m: message::Model) -> Result<Message, StoreError> {
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
        parent_id: m.parent_id,
        depth: m.depth,
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

/// The messages of one branch whose depths lie in `lo..=hi`, walking up from `leaf` (which
/// must be a message of this tenant; depth `hi` or deeper). The walk stops at depth `lo`, so a
/// page near the leaf reads only that far. The same SQL runs on both back-ends (`$n`
/// parameters are numbered on SQLite too).
const BRANCH_SQL: &str = "\
WITH RECURSIVE branch(id, parent_id, depth) AS ( \
  SELECT id, parent_id, depth FROM messages WHERE id = $1 AND tenant_id = $2 \
  UNION ALL \
  SELECT m.id, m.parent_id, m.depth FROM messages m JOIN branch b ON m.id = b.parent_id \
  WHERE m.tenant_id = $2 AND b.depth > $3 \
) \
SELECT messages.* FROM messages JOIN branch ON messages.id = branch.id \
WHERE branch.depth >= $3 AND branch.depth <= $4 \
ORDER BY messages.depth";

/// The newest message under `$1` (itself included): being the newest, it has no children,
/// so it is the leaf the branch through `$1` ends at when that branch is chosen.
const NEWEST_LEAF_SQL: &str = "\
WITH RECURSIVE below(id) AS ( \
  SELECT id FROM messages WHERE id = $1 AND tenant_id = $2 \
  UNION ALL \
  SELECT m.id FROM messages m JOIN below b ON m.parent_id = b.id WHERE m.tenant_id = $2 \
) \
SELECT messages.* FROM messages JOIN below ON messages.id = below.id \
ORDER BY messages.seq DESC LIMIT 1";

/// Messages of the branch ending at `leaf` with depths in `lo..=hi`, oldest first.
async fn branch_in<C: ConnectionTrait>(
    db: &C,
    tenant: Uuid,
    leaf: Uuid,
    lo: i64,
    hi: i64,
) -> Result<Vec<Message>, StoreError> {
    if hi < lo {
        return Ok(Vec::new());
    }
    let stmt = Statement::from_sql_and_values(
        db.get_database_backend(),
        BRANCH_SQL,
        [leaf.into(), tenant.into(), lo.into(), hi.into()],
    );
    let rows = message::Entity::find().from_raw_sql(stmt).all(db).await?;
    rows.into_iter().map(message_from_row).collect()
}

/// One message of a chat, or `MessageNotFound`.
async fn message_in<C: ConnectionTrait>(
    db: &C,
    tenant: Uuid,
    chat_id: Uuid,
    message_id: Uuid,
) -> Result<message::Model, StoreError> {
    message::Entity::find_by_id(message_id)
        .filter(message::Column::TenantId.eq(tenant))
        .filter(message::Column::ChatId.eq(chat_id))
        .one(db)
        .await?
        .ok_or(StoreError::MessageNotFound(message_id))
}

/// Makes `leaf` the chat's active leaf; the count follows its depth.
async fn set_active_in<C: ConnectionTrait>(
    db: &C,
    tenant: Uuid,
    chat_id: Uuid,
    leaf: &message::Model,
    ts: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    chat::Entity::update_many()
        .col_expr(chat::Column::ActiveMessageId, Expr::value(leaf.id))
        .col_expr(chat::Column::MessageCount, Expr::value(leaf.depth))
        .col_expr(chat::Column::LastActivityAt, Expr::value(ts))
        .filter(chat::Column::Id.eq(chat_id))
        .filter(chat::Column::TenantId.eq(tenant))
        .exec(db)
        .await?;
    Ok(())
}

impl TenantScope<'_> {
    /// A window of a chat's messages: of its active branch (in branch order; `total` is the
    /// branch's length) or of all its branches (in order of writing).
    pub async fn list_messages(
        &self,
        chat_id: Uuid,
        page: PageRequest,
        view: BranchView,
    ) -> Result<Page<Message>, StoreError> {
        let chat = find_chat_in(self.db, &self.owner(), chat_id).await?;
        if view == BranchView::Active {
            let total = chat.message_count.max(0) as u64;
            let items = match chat.active_message_id {
                None => Vec::new(),
                Some(leaf) => {
                    // Depths of the window, counted from the root (asc) or the leaf (desc).
                    let (first, last) = window(total, page);
                    let mut items =
                        branch_in(self.db, self.tenant, leaf, first as i64, last as i64).await?;
                    if page.order == Order::Desc {
                        items.reverse();
                    }
                    items
                }
            };
            return Ok(Page {
                items,
                total,
                offset: page.offset,
                limit: page.limit,
            });
        }
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

    /// Adds a message to a chat's tree (see [`Parent`]) and makes it the active leaf.
    /// `MessageNotFound` when the parent named is not a message of this chat.
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
                            chat::Column::LastSeq,
                            Expr::col(chat::Column::LastSeq).add(1),
                        )
                        .col_expr(chat::Column::LastActivityAt, Expr::value(ts))
                        .filter(chat::Column::Id.eq(chat_id))
                        .filter(owner.of_chat())
                        .exec(txn)
                        .await?;
                    if res.rows_affected == 0 {
                        return Err(StoreError::NotFound);
                    }
                    let chat = find_chat_in(txn, &owner, chat_id).await?;
                    let parent_id = match new.parent {
                        Parent::Active => chat.active_message_id,
                        Parent::Of(p) => p,
                    };
                    let depth = match parent_id {
                        None => 1,
                        Some(p) => message_in(txn, tenant, chat_id, p).await?.depth + 1,
                    };
                    let row = message::ActiveModel {
                        id: Set(Uuid::now_v7()),
                        tenant_id: Set(tenant),
                        chat_id: Set(chat_id),
                        seq: Set(chat.last_seq),
                        role: Set(new.role.as_str().to_string()),
                        content: Set(new.content),
                        metadata: Set(encode_object(&new.metadata)),
                        status: Set(new.status.as_str().to_string()),
                        prompt_tokens: Set(None),
                        completion_tokens: Set(None),
                        created_at: Set(ts),
                        updated_at: Set(ts),
                        replica_id: Set(replica),
                        parent_id: Set(parent_id),
                        depth: Set(depth),
                    };
                    let id = message::Entity::insert(row).exec(txn).await?.last_insert_id;
                    let m = message::Entity::find_by_id(id)
                        .filter(message::Column::TenantId.eq(tenant))
                        .one(txn)
                        .await?
                        .ok_or(StoreError::NotFound)?;
                    set_active_in(txn, tenant, chat_id, &m, ts).await?;
                    message_from_row(m)
                })
            })
            .await
            .map_err(StoreError::from)
    }

    /// Chooses the branch through `message_id`: its newest leaf becomes the chat's active
    /// one. Returns the chat as it is then (read in the same transaction). `MessageNotFound`
    /// when the message is not in this chat.
    pub async fn set_active_message(
        &self,
        chat_id: Uuid,
        message_id: Uuid,
    ) -> Result<Chat, StoreError> {
        let tenant = self.tenant;
        let owner = self.owner();
        self.db
            .transaction::<_, Chat, StoreError>(|txn| {
                Box::pin(async move {
                    lock_chat_in(txn, &owner, chat_id).await?;
                    message_in(txn, tenant, chat_id, message_id).await?;
                    let stmt = Statement::from_sql_and_values(
                        txn.get_database_backend(),
                        NEWEST_LEAF_SQL,
                        [message_id.into(), tenant.into()],
                    );
                    let leaf = message::Entity::find()
                        .from_raw_sql(stmt)
                        .one(txn)
                        .await?
                        .ok_or(StoreError::MessageNotFound(message_id))?;
                    set_active_in(txn, tenant, chat_id, &leaf, now()).await?;
                    chat_from_row(find_chat_in(txn, &owner, chat_id).await?)
                })
            })
            .await
            .map_err(StoreError::from)
    }

    /// The alternatives of each of `messages` (of this chat): the ids of all messages with
    /// the same parent, itself included, in order of writing. What a client needs to offer
    /// "‹ 2/3 ›" on a regenerated reply or an edited message.
    pub async fn siblings(
        &self,
        chat_id: Uuid,
        messages: &[Message],
    ) -> Result<HashMap<Uuid, Vec<Uuid>>, StoreError> {
        if messages.is_empty() {
            return Ok(HashMap::new());
        }
        let parents: Vec<Uuid> = messages.iter().filter_map(|m| m.parent_id).collect();
        let mut of_parent = Condition::any().add(message::Column::ParentId.is_in(parents));
        if messages.iter().any(|m| m.parent_id.is_none()) {
            of_parent = of_parent.add(message::Column::ParentId.is_null());
        }
        let rows: Vec<(Uuid, Option<Uuid>)> = message::Entity::find()
            .select_only()
            .column(message::Column::Id)
            .column(message::Column::ParentId)
            .filter(message::Column::TenantId.eq(self.tenant))
            .filter(message::Column::ChatId.eq(chat_id))
            .filter(of_parent)
            .order_by_asc(message::Column::Seq)
            .into_tuple()
            .all(self.db)
            .await?;
        let mut by_parent: HashMap<Option<Uuid>, Vec<Uuid>> = HashMap::new();
        for (id, parent) in rows {
            by_parent.entry(parent).or_default().push(id);
        }
        Ok(messages
            .iter()
            .map(|m| {
                let ids = by_parent.get(&m.parent_id).cloned().unwrap_or_default();
                (m.id, ids)
            })
            .collect())
    }

    /// The last `limit` messages of the branch that ends at `leaf`, oldest first: the
    /// history a reply to `leaf` is built from.
    pub async fn branch_history(
        &self,
        chat_id: Uuid,
        leaf: Uuid,
        limit: u64,
    ) -> Result<Vec<Message>, StoreError> {
        let depth = message_in(self.db, self.tenant, chat_id, leaf).await?.depth;
        let first = (depth - limit.min(i64::MAX as u64) as i64 + 1).max(1);
        branch_in(self.db, self.tenant, leaf, first, depth).await
    }

    /// The last `limit` messages of the active branch, oldest first.
    pub async fn recent_messages(
        &self,
        chat_id: Uuid,
        limit: u64,
    ) -> Result<Vec<Message>, StoreError> {
        let chat = find_chat_in(self.db, &self.owner(), chat_id).await?;
        match chat.active_message_id {
            None => Ok(Vec::new()),
            Some(leaf) => self.branch_history(chat_id, leaf, limit).await,
        }
    }

    /// One message of a chat. `NotFound` for a chat that is not there, `MessageNotFound`
    /// for a message that is not in it.
    pub async fn get_message(
        &self,
        chat_id: Uuid,
        message_id: Uuid,
    ) -> Result<Message, StoreError> {
        find_chat_in(self.db, &self.owner(), chat_id).await?;
        message_from_row(message_in(self.db, self.tenant, chat_id, message_id).await?)
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
