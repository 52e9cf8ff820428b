//! sea-orm entities, one per table. Private to the store: code outside `store` cannot build a
//! query on them, so it cannot forget the tenant filter that the repository functions apply.

pub(crate) mod admin_key;
pub(crate) mod api_key;
pub(crate) mod audit_log;
pub(crate) mod chat;
pub(crate) mod message;
pub(crate) mod tenant;
pub(crate) mod usage;
pub(crate) mod usage_by_key;
pub(crate) mod user;
pub(crate) mod user_token;
