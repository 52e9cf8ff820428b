//! The WebSocket protocol's vocabulary: the events the server sends and the messages a
//! client may send, with the parser that turns a text frame into one (or a precise error).
//!
//! Kept free of I/O so it can be tested (and fuzzed) on its own.

use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::limits::{reject_nul, validate_metadata, validate_user_id, Limits};

/// Token counts of a reply.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// How long a reply waited and how fast it came.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Timings {
    /// From the user message being queued to the reply starting.
    pub queue_ms: u64,
    /// From the reply starting to its first token (prompt processing); null if none came.
    pub time_to_first_token_ms: Option<u64>,
    pub tokens_per_second: f64,
}

/// A server event. Serialized with its `event_type` and a `timestamp` by [`Event::to_json`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event_type", rename_all = "snake_case")]
pub enum Event {
    ConnectionEstablished {
        user_id: String,
        chat_id: Uuid,
        tenant_id: Uuid,
    },
    UserCreated {
        user_id: String,
    },
    /// The user message is saved (as the active leaf), after `parent_id` (null for a
    /// chat's first message or an edit of it).
    MessageReceived {
        message_id: Uuid,
        chat_id: Uuid,
        parent_id: Option<Uuid>,
    },
    /// The reply to `message_id` (a user message) waits; `position` 1 is next.
    MessageQueued {
        message_id: Uuid,
        position: usize,
    },
    MessageStreamStarted {
        message_id: Uuid,
        chat_id: Uuid,
        reply_to: Uuid,
    },
    /// `index` counts deltas from 0. A socket that joins mid-reply first gets the text so
    /// far as one token event carrying the index of the last delta it covers.
    MessageStreamToken {
        message_id: Uuid,
        token: String,
        index: usize,
    },
    MessageStreamEnded {
        message_id: Uuid,
        content: String,
        finish_reason: &'static str,
        usage: Usage,
        /// The chat's `response_format` type when the reply was constrained to it.
        #[serde(skip_serializing_if = "Option::is_none")]
        response_format: Option<&'static str>,
        timings: Timings,
    },
    /// The chat changed: a title was written for it (the model's, after its first reply).
    ChatUpdated {
        chat_id: Uuid,
        title: Option<String>,
    },
    Pong,
    Error {
        code: &'static str,
        message: String,
        details: Value,
    },
}

#[derive(Serialize)]
struct Stamped<'a> {
    #[serde(flatten)]
    event: &'a Event,
    timestamp: String,
}

impl Event {
    /// The event as one JSON text frame, stamped with the current time (RFC 3339, UTC,
    /// milliseconds).
    pub fn to_json(&self) -> String {
        let stamped = Stamped {
            event: self,
            timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        };
        // Serializing plain structs, strings and numbers cannot fail.
        serde_json::to_string(&stamped).unwrap_or_else(|_| "{}".into())
    }
}

/// What a client asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Something to answer: a new message, an edit or a regenerated reply.
    Turn(Turn),
    /// Stop the chat's reply (queued or streaming).
    Cancel,
    Ping,
}

/// A turn a client starts in a chat; each one ends in a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    /// A new user message after the active leaf.
    Message {
        content: String,
        metadata: Map<String, Value>,
    },
    /// New text for the user message `message_id`: saved beside it (its sibling), so the
    /// branch it starts keeps the old one.
    Edit {
        message_id: Uuid,
        content: String,
        metadata: Map<String, Value>,
    },
    /// Another reply to the user message that the assistant message `message_id` answers
    /// (default: the active leaf's), beside the old reply.
    Regenerate { message_id: Option<Uuid> },
}

/// Input bounds of client messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// Largest text frame, in bytes.
    pub max_frame_bytes: usize,
    /// Longest `content`, in characters.
    pub max_content_chars: usize,
    /// Bounds of `metadata` (shared with the REST API).
    pub fields: Limits,
}

/// The close codes the server ends a socket with (RFC 6455 §7.4.1; the 44xx ones mirror the
/// HTTP status of the same error). Which error gets which code is decided once: by
/// [`FrameError`]'s constructors here and by `ApiError::close_code` for everything else.
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke a rule it was told about (read too slowly, sent too fast).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame far over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Something failed on the server.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// A connection parameter is missing or malformed.
    pub const BAD_REQUEST: u16 = 4400;
    /// The API key is missing or not valid.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The key works but may not do this: an admin key, or a disabled tenant's key (also
    /// sent to open sockets when their tenant is disabled or deleted).
    pub const FORBIDDEN: u16 = 4403;
    /// The chat does not exist (for this tenant and user), or was deleted.
    pub const NOT_FOUND: u16 = 4404;
    /// The tenant has too many open connections.
    pub const TOO_MANY: u16 = 4429;
}

/// Why a client's frame (or, on connecting, its parameters) was refused: the protocol's
/// own errors, with their stable codes. A refused frame leaves the connection open; refused
/// parameters close it with `close`.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    pub details: Value,
    /// The close code when this error ends the connection.
    pub close: u16,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>, details: Value) -> FrameError {
        FrameError {
            code,
            message: message.into(),
            details,
            close: close::BAD_REQUEST,
        }
    }

    /// A binary frame: the protocol is JSON text only.
    pub fn binary() -> FrameError {
        FrameError::new(
            "unsupported_message",
            "Binary frames are not supported; send JSON text frames.",
            json!({"frame": "binary"}),
        )
    }

    /// A frame over `max_frame_bytes`: refused, the connection stays open.
    pub fn too_large(bytes: usize, limits: &MessageLimits) -> FrameError {
        FrameError {
            close: close::TOO_BIG,
            ..FrameError::new(
                "message_too_large",
                format!(
                    "The frame is {bytes} bytes; at most {} are accepted.",
                    limits.max_frame_bytes
                ),
                json!({"bytes": bytes, "max_bytes": limits.max_frame_bytes}),
            )
        }
    }

    /// A frame so far over the limit that it was not even read: the connection ends.
    pub fn over_hard_limit() -> FrameError {
        FrameError {
            close: close::TOO_BIG,
            ..FrameError::new(
                "message_too_large",
                "The frame is far over the size limit; the connection is closed.",
                json!({}),
            )
        }
    }
}

/// Parses one text frame.
pub fn parse_client_message(
    text: &str,
    limits: &MessageLimits,
) -> Result<ClientMessage, FrameError> {
    if text.len() > limits.max_frame_bytes {
        return Err(FrameError::too_large(text.len(), limits));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        FrameError::new(
            "invalid_json",
            format!("The message is not valid JSON: {e}."),
            json!({"line": e.line(), "column": e.column()}),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(FrameError::new(
            "validation_error",
            "A message must be a JSON object such as {\"content\": \"Hello\"}.",
            json!({"field": "", "expected": "object"}),
        ));
    };
    const TYPES: [&str; 5] = ["message", "edit", "regenerate", "cancel", "ping"];
    let kind = match obj.get("type") {
        None => Some("message"),
        Some(Value::String(t)) => TYPES.iter().copied().find(|k| k == t),
        Some(_) => None,
    };
    let Some(kind) = kind else {
        let other = obj.get("type").cloned().unwrap_or_default();
        return Err(FrameError::new(
            "unsupported_message",
            format!(
                "Unknown message type {other}; use \"message\", \"edit\", \"regenerate\", \
                 \"cancel\" or \"ping\"."
            ),
            json!({"field": "type", "supported": TYPES}),
        ));
    };
    match kind {
        "cancel" => Ok(ClientMessage::Cancel),
        "ping" => Ok(ClientMessage::Ping),
        "regenerate" => Ok(ClientMessage::Turn(Turn::Regenerate {
            message_id: message_id(&mut obj, false)?,
        })),
        "edit" => {
            let id = message_id(&mut obj, true)?;
            let content = content(&mut obj, limits)?;
            let metadata = metadata(&mut obj, limits)?;
            Ok(ClientMessage::Turn(Turn::Edit {
                message_id: id.unwrap_or_default(),
                content,
                metadata,
            }))
        }
        _ => {
            let content = content(&mut obj, limits)?;
            let metadata = metadata(&mut obj, limits)?;
            Ok(ClientMessage::Turn(Turn::Message { content, metadata }))
        }
    }
}

/// The `message_id` field: a UUID (`required`, or absent/null).
fn message_id(obj: &mut Map<String, Value>, required: bool) -> Result<Option<Uuid>, FrameError> {
    match obj.remove("message_id") {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(FrameError::new(
            "validation_error",
            "message_id is required: name the message to edit.",
            json!({"field": "message_id", "expected": "uuid"}),
        )),
        Some(Value::String(s)) => match Uuid::parse_str(&s) {
            Ok(id) => Ok(Some(id)),
            Err(e) => Err(FrameError::new(
                "validation_error",
                format!("message_id is not a UUID: {e}."),
                json!({"field": "message_id", "expected": "uuid"}),
            )),
        },
        Some(_) => Err(FrameError::new(
            "validation_error",
            "message_id must be a string (a message's UUID).",
            json!({"field": "message_id", "expected": "uuid"}),
        )),
    }
}

/// The `content` field: non-blank text within the limits.
fn content(obj: &mut Map<String, Value>, limits: &MessageLimits) -> Result<String, FrameError> {
    let content = match obj.remove("content") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) => {
            return Err(FrameError::new(
                "validation_error",
                "content must not be empty.",
                json!({"field": "content", "min_chars": 1}),
            ))
        }
        None | Some(Value::Null) => {
            return Err(FrameError::new(
                "validation_error",
                "content is required: send {\"content\": \"…\"}.",
                json!({"field": "content", "expected": "string"}),
            ))
        }
        Some(_) => {
            return Err(FrameError::new(
                "validation_error",
                "content must be a string.",
                json!({"field": "content", "expected": "string"}),
            ))
        }
    };
    if let Err(e) = reject_nul("content", &content) {
        return Err(FrameError::new(
            "validation_error",
            format!("{e}."),
            json!({"field": "content", "forbidden": "U+0000"}),
        ));
    }
    let chars = content.chars().count();
    if chars > limits.max_content_chars {
        return Err(FrameError::new(
            "content_too_long",
            format!(
                "content is {chars} characters; at most {} are accepted.",
                limits.max_content_chars
            ),
            json!({"field": "content", "chars": chars, "max_chars": limits.max_content_chars}),
        ));
    }
    Ok(content)
}

/// The `metadata` field: an object within the limits (absent or null: empty).
fn metadata(
    obj: &mut Map<String, Value>,
    limits: &MessageLimits,
) -> Result<Map<String, Value>, FrameError> {
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(FrameError::new(
                "validation_error",
                "metadata must be a JSON object.",
                json!({"field": "metadata", "expected": "object"}),
            ))
        }
    };
    validate_metadata(&limits.fields, &metadata).map_err(|e| {
        FrameError::new(
            "validation_error",
            e.to_string(),
            json!({"field": e.field, "rule": e.rule}),
        )
    })?;
    Ok(metadata)
}

/// What a client presented on connecting: query parameters first, then `X-…` headers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub api_key: Option<String>,
    pub user_id: Option<String>,
    pub chat_id: Option<String>,
}

impl Credentials {
    /// From the upgrade request's query string and a header lookup. The first occurrence
    /// of a query parameter wins; a header fills in what the query left out.
    pub fn parse<'a>(query: Option<&str>, header: impl Fn(&str) -> Option<&'a str>) -> Credentials {
        let mut c = Credentials::default();
        if let Some(q) = query {
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                let slot = match &*k {
                    "api_key" => &mut c.api_key,
                    "user_id" => &mut c.user_id,
                    "chat_id" => &mut c.chat_id,
                    _ => continue,
                };
                slot.get_or_insert_with(|| v.into_owned());
            }
        }
        let from_header = |name: &str| header(name).map(str::to_string);
        c.api_key = c.api_key.or_else(|| from_header("X-API-Key"));
        c.user_id = c.user_id.or_else(|| from_header("X-User-ID"));
        c.chat_id = c.chat_id.or_else(|| from_header("X-Chat-ID"));
        c
    }

    /// Checks presence and form (not the key itself, which needs the store): the key, the
    /// user id and the chat id as a UUID, or why the connection is refused.
    pub fn validate(self) -> Result<(String, String, Uuid), FrameError> {
        let key = self.api_key.ok_or_else(|| FrameError {
            close: close::UNAUTHORIZED,
            ..FrameError::new(
                "missing_api_key",
                "An API key is required: pass api_key as a query parameter or the X-API-Key header.",
                json!({"parameter": "api_key", "header": "X-API-Key"}),
            )
        })?;
        let missing = |parameter: &'static str, header: &'static str| {
            FrameError::new(
                "missing_parameter",
                format!("{parameter} is required: pass it as a query parameter or as the {header} header."),
                json!({"parameter": parameter, "header": header}),
            )
        };
        let user_id = self
            .user_id
            .ok_or_else(|| missing("user_id", "X-User-ID"))?;
        let chat_id = self
            .chat_id
            .ok_or_else(|| missing("chat_id", "X-Chat-ID"))?;
        validate_user_id("user_id", &user_id).map_err(|e| {
            FrameError::new(
                "validation_error",
                e.to_string(),
                json!({"parameter": "user_id", "rule": e.rule}),
            )
        })?;
        let chat_id = Uuid::parse_str(&chat_id).map_err(|_| {
            FrameError::new(
                "validation_error",
                "chat_id must be a UUID.",
                json!({"parameter": "chat_id", "expected": "uuid"}),
            )
        })?;
        Ok((key, user_id, chat_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> MessageLimits {
        MessageLimits {
            max_frame_bytes: 1000,
            max_content_chars: 10,
            fields: Limits::default(),
        }
    }

    fn code(text: &str) -> &'static str {
        parse_client_message(text, &limits()).unwrap_err().code
    }

    #[test]
    fn parses_the_three_kinds() {
        let m = parse_client_message(r#"{"content":"héllo","metadata":{"a":1}}"#, &limits());
        assert_eq!(
            m.unwrap(),
            ClientMessage::Turn(Turn::Message {
                content: "héllo".into(),
                metadata: json!({"a": 1}).as_object().unwrap().clone()
            })
        );
        assert!(matches!(
            parse_client_message(r#"{"type":"message","content":"x"}"#, &limits()),
            Ok(ClientMessage::Turn(Turn::Message { .. }))
        ));
        assert_eq!(
            parse_client_message(r#"{"type":"cancel"}"#, &limits()),
            Ok(ClientMessage::Cancel)
        );
        assert_eq!(
            parse_client_message(r#"{"type":"ping"}"#, &limits()),
            Ok(ClientMessage::Ping)
        );
    }

    #[test]
    fn parses_edit_and_regenerate() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse_client_message(
                &format!(r#"{{"type":"edit","message_id":"{id}","content":"new"}}"#),
                &limits()
            ),
            Ok(ClientMessage::Turn(Turn::Edit {
                message_id: id,
                content: "new".into(),
                metadata: Map::new()
            }))
        );
        assert_eq!(
            parse_client_message(r#"{"type":"regenerate"}"#, &limits()),
            Ok(ClientMessage::Turn(Turn::Regenerate { message_id: None }))
        );
        assert_eq!(
            parse_client_message(
                &format!(r#"{{"type":"regenerate","message_id":"{id}"}}"#),
                &limits()
            ),
            Ok(ClientMessage::Turn(Turn::Regenerate {
                message_id: Some(id)
            }))
        );
        // An edit is checked like a message, and needs the id.
        for bad in [
            r#"{"type":"edit","content":"x"}"#.to_string(),
            format!(r#"{{"type":"edit","message_id":"{id}"}}"#),
            format!(r#"{{"type":"edit","message_id":"{id}","content":" "}}"#),
            r#"{"type":"edit","message_id":"x","content":"y"}"#.to_string(),
            r#"{"type":"regenerate","message_id":5}"#.to_string(),
        ] {
            assert_eq!(code(&bad), "validation_error", "{bad}");
        }
        assert_eq!(
            code(&format!(
                r#"{{"type":"edit","message_id":"{id}","content":"01234567890"}}"#
            )),
            "content_too_long"
        );
    }

    #[test]
    fn each_bad_input_has_its_code() {
        assert_eq!(code("{"), "invalid_json");
        assert_eq!(code("[1]"), "validation_error");
        assert_eq!(code(r#"{"metadata":{}}"#), "validation_error");
        assert_eq!(code(r#"{"content":""}"#), "validation_error");
        assert_eq!(code(r#"{"content":"  \n"}"#), "validation_error");
        assert_eq!(code(r#"{"content":5}"#), "validation_error");
        assert_eq!(code(r#"{"content":"a\u0000b"}"#), "validation_error");
        assert_eq!(
            code(r#"{"content":"x","metadata":[1]}"#),
            "validation_error"
        );
        assert_eq!(code(r#"{"content":"01234567890"}"#), "content_too_long");
        assert_eq!(
            code(r#"{"type":"shout","content":"x"}"#),
            "unsupported_message"
        );
        assert_eq!(code(r#"{"type":7}"#), "unsupported_message");
        assert_eq!(
            code(&format!(r#"{{"content":"{}"}}"#, "x".repeat(1000))),
            "message_too_large"
        );
    }

    #[test]
    fn events_carry_type_and_millisecond_utc_timestamp() {
        let e = Event::MessageQueued {
            message_id: Uuid::nil(),
            position: 2,
        };
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["event_type"], "message_queued");
        assert_eq!(v["position"], 2);
        let ts = v["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
        let v: Value = serde_json::from_str(&Event::Pong.to_json()).unwrap();
        assert_eq!(v["event_type"], "pong");
    }

    #[test]
    fn credentials_from_query_then_headers() {
        let headers = [("X-User-ID", "hdr-user"), ("X-Chat-ID", "hdr-chat")];
        let lookup = |n: &str| headers.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        let c = Credentials::parse(
            Some("api_key=k%20y&user_id=q-user&user_id=second&x=1"),
            lookup,
        );
        assert_eq!(c.api_key.as_deref(), Some("k y"));
        assert_eq!(c.user_id.as_deref(), Some("q-user"));
        assert_eq!(c.chat_id.as_deref(), Some("hdr-chat"));
        assert_eq!(c.validate().unwrap_err().close, 4400, "hdr-chat is no UUID");
        let id = Uuid::new_v4();
        let c = Credentials::parse(Some(&format!("api_key=k&user_id=u&chat_id={id}")), |_| None);
        assert_eq!(c.validate().unwrap(), ("k".into(), "u".into(), id));
        let e = Credentials::default().validate().unwrap_err();
        assert_eq!((e.code, e.close), ("missing_api_key", 4401));
    }
}
