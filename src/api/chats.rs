//! `/api/v1/chats`: create, list, read, change and delete chats, and read their messages.

use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};
use uuid::Uuid;

use super::auth::TenantAuth;
use super::dto::{
    BranchDto, ChatDto, ChatListDto, CreateChatRequest, MessageDto, MessageListDto, OrderDto,
    SetActiveRequest, UpdateChatRequest,
};
use super::types::{RuledText, UserIdRule};
use super::{ApiTags, AppState};
use crate::domain::{self, PageRequest};
use crate::error::{ApiError, Authed, Failure, OnChat, OnChatWithBody, WithBody};
use crate::store::SearchQuery;

#[derive(ApiResponse)]
pub enum CreatedChat {
    /// The chat was created.
    #[oai(status = 201)]
    Created(Json<ChatDto>),
}

#[derive(ApiResponse)]
pub enum OneChat {
    /// The chat.
    #[oai(status = 200)]
    Ok(Json<ChatDto>),
}

#[derive(ApiResponse)]
pub enum ChatPage {
    /// One page of the user's chats, newest first.
    #[oai(status = 200)]
    Ok(Json<ChatListDto>),
}

#[derive(ApiResponse)]
pub enum MessagePage {
    /// One page of the chat's messages.
    #[oai(status = 200)]
    Ok(Json<MessageListDto>),
}

#[derive(ApiResponse)]
pub enum Deleted {
    /// The chat and its messages are deleted.
    #[oai(status = 204)]
    NoContent,
}

/// The chat REST operations.
pub struct ChatsApi;

async fn create_chat(
    state: &AppState,
    auth: TenantAuth,
    body: CreateChatRequest,
) -> Result<CreatedChat, Failure<WithBody>> {
    let new = body.into_domain(&state.limits)?;
    auth.0.may_act_for(&new.user_id)?;
    check_response_format(state, new.config.response_format.as_ref()).await?;
    let (chat, _created_user) = auth.0.scope(&state.store).create_chat(new).await?;
    Ok(CreatedChat::Created(Json(ChatDto::new(
        auth.0.tenant.as_uuid(),
        chat,
    ))))
}

/// Refuses a `response_format` the model cannot be held to (a schema keyword the grammar
/// engine does not support, an unsatisfiable schema) when it is set, rather than at every
/// reply. While the model is still loading the check waits for the first reply.
async fn check_response_format(
    state: &AppState,
    format: Option<&crate::domain::ResponseFormat>,
) -> Result<(), ApiError> {
    let (Some(f), Some(engine)) = (format, state.model.engine()) else {
        return Ok(());
    };
    match engine.check_grammar(f.into()).await {
        Err(crate::engine::EngineError::InvalidGrammar(m)) => {
            Err(ApiError::unenforceable("config.response_format", m))
        }
        other => other.map_err(ApiError::from),
    }
}

fn page(offset: u64, limit: u64, order: OrderDto) -> PageRequest {
    PageRequest {
        offset,
        limit,
        order: order.into(),
    }
}

#[OpenApi(tag = "ApiTags::Chats")]
impl ChatsApi {
    /// Create a chat
    ///
    /// Creates a chat for `user_id` (the user is created on first use). Connect to
    /// `/ws/chat` with the returned `id` to talk in it. `POST /api/v1/chats/` (with the
    /// trailing slash) is the same operation.
    #[oai(path = "/api/v1/chats", method = "post", operation_id = "create_chat")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        body: Json<CreateChatRequest>,
    ) -> Result<CreatedChat, Failure<WithBody>> {
        create_chat(&state, auth, body.0).await
    }

    /// List a user's chats
    ///
    /// The chats of one user of this tenant, newest first. An unknown user has no chats.
    /// With `q`, only the chats whose title or messages hold every word of it (stemmed, as
    /// the database's full-text search does it), each with a `match`: a snippet of its
    /// newest matching message (or of its title) and where the words are in it.
    #[oai(
        path = "/api/v1/chats/user/:user_id",
        method = "get",
        operation_id = "list_user_chats"
    )]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        /// The client's id of the user.
        user_id: Path<RuledText<UserIdRule>>,
        /// Number of chats to skip.
        #[oai(
            default,
            validator(minimum(value = "0"), maximum(value = "1000000000"))
        )]
        offset: Query<u64>,
        /// Page size, 1 to 200.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "200"))
        )]
        limit: Query<u64>,
        /// Words to search for in titles and messages (all must occur), up to 256
        /// characters.
        #[oai(validator(max_length = 256))]
        q: Query<Option<String>>,
    ) -> Result<ChatPage, Failure<Authed>> {
        let user_id = user_id.0 .0;
        domain::validate_user_id("user_id", &user_id).map_err(|v| ApiError::InvalidParameter {
            name: "user_id".into(),
            reason: v.message,
        })?;
        auth.0.may_act_for(&user_id)?;
        let scope = auth.0.scope(&state.store);
        let window = page(offset.0, limit.0, OrderDto::Desc);
        let tenant = auth.0.tenant.as_uuid();
        let list = |total, offset, limit, has_more, chats| {
            ChatPage::Ok(Json(ChatListDto {
                total,
                offset,
                limit,
                has_more,
                chats,
            }))
        };
        if let Some(text) = q.0 {
            let query = SearchQuery::parse(&text).ok_or_else(|| ApiError::InvalidParameter {
                name: "q".into(),
                reason: "it has no words to search for (letters or digits)".into(),
            })?;
            let p = scope.search_chats(&user_id, &query, window).await?;
            let has_more = p.has_more();
            let chats = p
                .items
                .into_iter()
                .map(|m| ChatDto::matched(tenant, m))
                .collect();
            return Ok(list(p.total, p.offset, p.limit, has_more, chats));
        }
        let p = scope.list_chats(&user_id, window).await?;
        let has_more = p.has_more();
        let chats = p
            .items
            .into_iter()
            .map(|c| ChatDto::new(tenant, c))
            .collect();
        Ok(list(p.total, p.offset, p.limit, has_more, chats))
    }

    /// Get a chat
    ///
    /// The chat with its message count and last activity. A chat of another tenant answers
    /// exactly like one that does not exist.
    #[oai(
        path = "/api/v1/chats/:chat_id",
        method = "get",
        operation_id = "get_chat"
    )]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        chat_id: Path<Uuid>,
    ) -> Result<OneChat, Failure<OnChat>> {
        let chat = auth
            .0
            .scope(&state.store)
            .get_chat(chat_id.0)
            .await
            .map_err(ApiError::for_chat(chat_id.0))?;
        Ok(OneChat::Ok(Json(ChatDto::new(
            auth.0.tenant.as_uuid(),
            chat,
        ))))
    }

    /// Get a chat's messages
    ///
    /// The active branch's messages in conversation order (`asc`, the default) or newest
    /// first (`desc`); `total` and `has_more` are about that branch. `branch=all` pages every
    /// message of every branch in order of writing (`seq`): with `parent_id` a client can
    /// draw the whole tree.
    #[oai(
        path = "/api/v1/chats/:chat_id/messages",
        method = "get",
        operation_id = "list_messages"
    )]
    // poem-openapi takes each query parameter as an argument of its own.
    #[allow(clippy::too_many_arguments)]
    async fn messages(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        chat_id: Path<Uuid>,
        /// Number of messages to skip.
        #[oai(
            default,
            validator(minimum(value = "0"), maximum(value = "1000000000"))
        )]
        offset: Query<u64>,
        /// Page size, 1 to 200.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "200"))
        )]
        limit: Query<u64>,
        /// `asc` (oldest first, the default) or `desc`.
        #[oai(default)]
        order: Query<OrderDto>,
        /// `active` (the default): the active branch; `all`: every message.
        #[oai(default)]
        branch: Query<BranchDto>,
    ) -> Result<MessagePage, Failure<OnChat>> {
        let scope = auth.0.scope(&state.store);
        let view: domain::BranchView = branch.0.into();
        let p = scope
            .list_messages(chat_id.0, page(offset.0, limit.0, order.0), view)
            .await
            .map_err(ApiError::for_chat(chat_id.0))?;
        let mut siblings = match view {
            domain::BranchView::Active => scope
                .siblings(chat_id.0, &p.items)
                .await
                .map_err(ApiError::for_chat(chat_id.0))?,
            domain::BranchView::All => Default::default(),
        };
        let has_more = p.has_more();
        let messages = p
            .items
            .into_iter()
            .map(|m| {
                let of = siblings.remove(&m.id);
                MessageDto {
                    siblings: of,
                    ..MessageDto::from(m)
                }
            })
            .collect();
        Ok(MessagePage::Ok(Json(MessageListDto {
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            has_more,
            messages,
        })))
    }

    /// Switch a chat's branch
    ///
    /// Makes the branch through `message_id` the active one: its newest leaf becomes the
    /// chat's active message, the next reply is built from that branch only, and the chat's
    /// `message_count` is its length. Returns the chat as it is afterwards.
    #[oai(
        path = "/api/v1/chats/:chat_id/active",
        method = "put",
        operation_id = "set_active_message"
    )]
    async fn set_active(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        chat_id: Path<Uuid>,
        body: Json<SetActiveRequest>,
    ) -> Result<OneChat, Failure<OnChatWithBody>> {
        let chat = auth
            .0
            .scope(&state.store)
            .set_active_message(chat_id.0, body.0.message_id)
            .await
            .map_err(ApiError::for_chat(chat_id.0))?;
        Ok(OneChat::Ok(Json(ChatDto::new(
            auth.0.tenant.as_uuid(),
            chat,
        ))))
    }

    /// Change a chat
    ///
    /// Changes the title, replaces the metadata, or merges settings into the config.
    /// Fields left out stay as they are; `null` clears the title or a config field.
    #[oai(
        path = "/api/v1/chats/:chat_id",
        method = "patch",
        operation_id = "update_chat"
    )]
    async fn update(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        chat_id: Path<Uuid>,
        body: Json<UpdateChatRequest>,
    ) -> Result<OneChat, Failure<OnChatWithBody>> {
        let update = body.0.into_domain(&state.limits)?;
        if let Some(domain::Patch::Set(f)) = update.config.as_ref().map(|c| &c.response_format) {
            check_response_format(&state, Some(f)).await?;
        }
        let config_changed = update.config.is_some();
        let chat = auth
            .0
            .scope(&state.store)
            .update_chat(chat_id.0, update)
            .await
            .map_err(ApiError::for_chat(chat_id.0))?;
        if config_changed {
            state.chat.chat_changed(chat_id.0);
        }
        Ok(OneChat::Ok(Json(ChatDto::new(
            auth.0.tenant.as_uuid(),
            chat,
        ))))
    }

    /// Delete a chat
    ///
    /// Deletes the chat and all its messages.
    #[oai(
        path = "/api/v1/chats/:chat_id",
        method = "delete",
        operation_id = "delete_chat"
    )]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        chat_id: Path<Uuid>,
    ) -> Result<Deleted, Failure<OnChat>> {
        auth.0
            .scope(&state.store)
            .delete_chat(chat_id.0)
            .await
            .map_err(ApiError::for_chat(chat_id.0))?;
        state.chat.chat_deleted(auth.0.tenant, chat_id.0);
        Ok(Deleted::NoContent)
    }
}

fn default_limit() -> u64 {
    50
}
