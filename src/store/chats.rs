//! Chats and users of one tenant.

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::entity::{chat, user};
use super::json::{decode_object, encode_object};
use super::{StoreError, TenantScope};
use crate::domain::{now, Chat, ChatConfig, ChatUpdate, NewChat, Page, PageRequest};

pub(super) fn chat_from_row(m: chat::Model) -> Result<Chat, StoreError> {
    let metadata = decode_object(&m.metadata, &format_args!("chat {} metadata", m.id))?;
    let config: ChatConfig = serde_json::from_str(&m.config)
        .map_err(|e| StoreError::Corrupt(format!("chat {} config: {e}", m.id)))?;
    Ok(Chat {
        id: m.id,
        user_id: m.user_id,
        title: m.title,
        metadata,
        config,
        message_count: m.message_count,
        active_message_id: m.active_message_id,
        created_at: m.created_at,
        updated_at: m.updated_at,
        last_activity_at: m.last_activity_at,
    })
}

pub(super) fn config_json(c: &ChatConfig) -> Result<String, StoreError> {
    serde_json::to_string(c)
        .map_err(|e| StoreError::Corrupt(format!("config does not encode: {e}")))
}

/// Inserts the user unless it exists; true when it was created now.
pub(super) async fn ensure_user_in<C: ConnectionTrait>(
    db: &C,
    tenant: Uuid,
    user_id: &str,
) -> Result<bool, StoreError> {
    let inserted = user::Entity::insert(user::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(tenant),
        user_id: Set(user_id.to_string()),
        created_at: Set(now()),
    })
    .on_conflict(
        OnConflict::columns([user::Column::TenantId, user::Column::UserId])
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    Ok(inserted == 1)
}

/// Whose chats a query may reach: a tenant's, or only one of its users'.
#[derive(Debug, Clone)]
pub(super) struct Owner {
    pub tenant: Uuid,
    pub user: Option<String>,
}

impl Owner {
    /// The condition on the `chats` table.
    pub fn of_chat(&self) -> Condition {
        let c = Condition::all().add(chat::Column::TenantId.eq(self.tenant));
        match &self.user {
            Some(u) => c.add(chat::Column::UserId.eq(u.as_str())),
            None => c,
        }
    }
}

/// Reads a chat of an owner inside any connection or transaction.
pub(super) async fn find_chat_in<C: ConnectionTrait>(
    db: &C,
    owner: &Owner,
    chat_id: Uuid,
) -> Result<chat::Model, StoreError> {
    chat::Entity::find_by_id(chat_id)
        .filter(owner.of_chat())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)
}

/// Starts a write transaction on a chat by writing to its row first (a no-op update), and
/// says whether it exists. Writing first matters on SQLite: a transaction that reads before
/// it writes cannot wait for the write lock once another writer committed after its read
/// ("database is locked"), while one that writes first simply queues. On PostgreSQL it takes
/// the row lock, so concurrent changes of one chat apply one after the other.
pub(super) async fn lock_chat_in<C: ConnectionTrait>(
    db: &C,
    owner: &Owner,
    chat_id: Uuid,
) -> Result<(), StoreError> {
    let res = chat::Entity::update_many()
        .col_expr(
            chat::Column::UpdatedAt,
            sea_orm::sea_query::Expr::col(chat::Column::UpdatedAt).into(),
        )
        .filter(chat::Column::Id.eq(chat_id))
        .filter(owner.of_chat())
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

impl TenantScope<'_> {
    /// Makes sure a user exists; true when it was created by this call.
    pub async fn ensure_user(&self, user_id: &str) -> Result<bool, StoreError> {
        ensure_user_in(self.db, self.tenant, user_id).await
    }

    /// Creates a chat (and its user, on first use). Returns the chat and whether the user
    /// was new.
    pub async fn create_chat(&self, new: NewChat) -> Result<(Chat, bool), StoreError> {
        if self.user.is_some_and(|u| u != new.user_id) {
            return Err(StoreError::Invalid(format!(
                "this token acts for user {:?} only",
                self.user.unwrap_or_default()
            )));
        }
        let tenant = self.tenant;
        let owner = self.owner();
        let config = config_json(&new.config)?;
        self.db
            .transaction::<_, (Chat, bool), StoreError>(|txn| {
                Box::pin(async move {
                    let created_user = ensure_user_in(txn, tenant, &new.user_id).await?;
                    let ts = now();
                    let row = chat::ActiveModel {
                        id: Set(Uuid::now_v7()),
                        tenant_id: Set(tenant),
                        user_id: Set(new.user_id),
                        title: Set(new.title),
                        metadata: Set(encode_object(&new.metadata)),
                        config: Set(config),
                        message_count: Set(0),
                        active_message_id: Set(None),
                        last_seq: Set(0),
                        created_at: Set(ts),
                        updated_at: Set(ts),
                        last_activity_at: Set(ts),
                    };
                    let id = chat::Entity::insert(row).exec(txn).await?.last_insert_id;
                    let chat = chat_from_row(find_chat_in(txn, &owner, id).await?)?;
                    Ok((chat, created_user))
                })
            })
            .await
            .map_err(StoreError::from)
    }

    /// One chat of this tenant.
    pub async fn get_chat(&self, chat_id: Uuid) -> Result<Chat, StoreError> {
        chat_from_row(find_chat_in(self.db, &self.owner(), chat_id).await?)
    }

    /// A user's chats, newest first.
    pub async fn list_chats(
        &self,
        user_id: &str,
        page: PageRequest,
    ) -> Result<Page<Chat>, StoreError> {
        let (rows, total) = self.user_chats(user_id, Condition::all(), page).await?;
        let items = rows
            .into_iter()
            .map(chat_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page {
            items,
            total,
            offset: page.offset,
            limit: page.limit,
        })
    }

    /// A page of `user_id`'s chats that also meet `filter`, newest first, and how many
    /// there are: the one order of a user's chat list, searched (`search_chats`) or not.
    pub(super) async fn user_chats(
        &self,
        user_id: &str,
        filter: Condition,
        page: PageRequest,
    ) -> Result<(Vec<chat::Model>, u64), StoreError> {
        let base = chat::Entity::find()
            .filter(self.owner().of_chat())
            .filter(chat::Column::UserId.eq(user_id))
            .filter(filter);
        let total = base.clone().count(self.db).await?;
        let rows = base
            .order_by_desc(chat::Column::CreatedAt)
            .order_by_desc(chat::Column::Id)
            .offset(page.offset)
            .limit(page.limit)
            .all(self.db)
            .await?;
        Ok((rows, total))
    }

    /// Applies a change to a chat and returns it as stored afterwards.
    pub async fn update_chat(&self, chat_id: Uuid, update: ChatUpdate) -> Result<Chat, StoreError> {
        let tenant = self.tenant;
        let owner = self.owner();
        if update.is_empty() {
            return self.get_chat(chat_id).await;
        }
        self.db
            .transaction::<_, Chat, StoreError>(|txn| {
                Box::pin(async move {
                    lock_chat_in(txn, &owner, chat_id).await?;
                    let row = find_chat_in(txn, &owner, chat_id).await?;
                    let mut chat = chat_from_row(row)?;
                    update.title.apply(&mut chat.title);
                    if let Some(m) = update.metadata {
                        chat.metadata = m;
                    }
                    if let Some(p) = update.config {
                        chat.config.apply(p);
                    }
                    let ts = now();
                    let am = chat::ActiveModel {
                        id: Set(chat.id),
                        title: Set(chat.title.clone()),
                        metadata: Set(encode_object(&chat.metadata)),
                        config: Set(config_json(&chat.config)?),
                        updated_at: Set(ts),
                        last_activity_at: Set(ts),
                        ..Default::default()
                    };
                    let res = chat::Entity::update_many()
                        .set(am)
                        .filter(chat::Column::Id.eq(chat_id))
                        .filter(chat::Column::TenantId.eq(tenant))
                        .exec(txn)
                        .await?;
                    if res.rows_affected == 0 {
                        return Err(StoreError::NotFound);
                    }
                    chat_from_row(find_chat_in(txn, &owner, chat_id).await?)
                })
            })
            .await
            .map_err(StoreError::from)
    }

    /// Gives a chat a title unless it has one (a client's title always wins over a written
    /// one, even when both arrive together). True when this call set it.
    pub async fn set_title_if_unset(&self, chat_id: Uuid, title: &str) -> Result<bool, StoreError> {
        let res = chat::Entity::update_many()
            .col_expr(chat::Column::Title, sea_orm::sea_query::Expr::value(title))
            .col_expr(
                chat::Column::UpdatedAt,
                sea_orm::sea_query::Expr::value(now()),
            )
            .filter(chat::Column::Id.eq(chat_id))
            .filter(self.owner().of_chat())
            .filter(chat::Column::Title.is_null())
            .exec(self.db)
            .await?;
        Ok(res.rows_affected == 1)
    }

    /// Deletes a chat and its messages.
    pub async fn delete_chat(&self, chat_id: Uuid) -> Result<(), StoreError> {
        let tenant = self.tenant;
        let owner = self.owner();
        self.db
            .transaction::<_, (), StoreError>(|txn| {
                Box::pin(async move {
                    lock_chat_in(txn, &owner, chat_id).await?;
                    // Explicit, so the messages go even where foreign keys are not enforced.
                    super::entity::message::Entity::delete_many()
                        .filter(super::entity::message::Column::ChatId.eq(chat_id))
                        .filter(super::entity::message::Column::TenantId.eq(tenant))
                        .exec(txn)
                        .await?;
                    chat::Entity::delete_many()
                        .filter(chat::Column::Id.eq(chat_id))
                        .filter(chat::Column::TenantId.eq(tenant))
                        .exec(txn)
                        .await?;
                    Ok(())
                })
            })
            .await
            .map_err(StoreError::from)
    }
}
