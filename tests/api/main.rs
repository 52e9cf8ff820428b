//! Integration tests of the REST API against the real server, on SQLite and PostgreSQL.
//! One test binary, so the suite links once.

mod common;

mod admin;
mod anthropic;
mod audit;
mod auth;
mod binary;
mod branches;
mod budgets;
mod chats;
mod cluster;
mod engine;
mod errors;
mod faults;
mod hardening;
mod isolation;
mod limits;
mod load;
mod messages;
mod openai;
mod openapi;
mod reference;
mod search;
mod smollm2;
mod structured;
mod tiny;
mod titles;
mod tokens;
mod tools;
mod transfer;
mod ws;
