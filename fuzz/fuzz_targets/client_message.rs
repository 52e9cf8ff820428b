//! Any text frame: the parser returns a message or a refusal with a stable code and close
//! code, never panics, and a refusal's fields make an event that serializes.
#![no_main]

use confab_protocol::ws::{close, parse_client_message, ClientMessage, Event, MessageLimits, Turn};
use libfuzzer_sys::fuzz_target;

const CODES: &[&str] = &[
    "invalid_json",
    "validation_error",
    "content_too_long",
    "message_too_large",
    "unsupported_message",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = MessageLimits {
        max_frame_bytes: 4096,
        max_content_chars: 512,
        fields: Default::default(),
    };
    match parse_client_message(text, &limits) {
        Ok(ClientMessage::Turn(
            Turn::Message { content, metadata } | Turn::Edit { content, metadata, .. },
        )) => {
            assert!(!content.trim().is_empty());
            assert!(content.chars().count() <= limits.max_content_chars);
            assert!(serde_json::to_string(&metadata).unwrap().len() <= limits.fields.max_metadata_bytes);
        }
        Ok(_) => {}
        Err(e) => {
            assert!(CODES.contains(&e.code), "unexpected code {}", e.code);
            assert!(!e.message.is_empty());
            assert!(e.details.is_object());
            assert!(e.close == close::BAD_REQUEST || e.close == close::TOO_BIG);
            let event = Event::Error {
                code: e.code,
                message: e.message,
                details: e.details,
            };
            let json = event.to_json();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["event_type"], "error");
        }
    }
});
