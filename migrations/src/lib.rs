//! Database schema migrations for confab, one timestamped file each.
//!
//! They run at start-up (`Migrator::up`) on SQLite and PostgreSQL alike, so every statement
//! here sticks to what both back-ends understand through sea-query.

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_init;
mod m20261127_000001_tenant_limits;
mod m20261127_000002_usage;
mod m20261202_000001_replica;
mod m20261202_000002_key_names;
mod m20261204_000001_admin;
mod m20261204_000002_budgets;
mod m20261204_000003_user_tokens;
mod m20261204_000004_audit;
mod m20261206_000001_message_tree;
mod m20261206_000002_search;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_init::Migration),
            Box::new(m20261127_000001_tenant_limits::Migration),
            Box::new(m20261127_000002_usage::Migration),
            Box::new(m20261202_000001_replica::Migration),
            Box::new(m20261202_000002_key_names::Migration),
            Box::new(m20261204_000001_admin::Migration),
            Box::new(m20261204_000002_budgets::Migration),
            Box::new(m20261204_000003_user_tokens::Migration),
            Box::new(m20261204_000004_audit::Migration),
            Box::new(m20261206_000001_message_tree::Migration),
            Box::new(m20261206_000002_search::Migration),
        ]
    }
}
