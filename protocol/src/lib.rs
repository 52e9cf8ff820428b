//! What clients may send confab, checked without I/O: the input rules shared by the REST
//! API and the WebSocket ([`limits`]), and the WebSocket protocol's vocabulary, parser and
//! close codes ([`ws`]).
//!
//! A crate of its own so it can be fuzzed (and tested) without building the server.

pub mod limits;
pub mod ws;
