//! Any query string and header values: parsing and checking the connection credentials
//! never panics, and a refusal carries one of the documented close codes.
#![no_main]

use confab_protocol::ws::Credentials;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, Option<&str>, Option<&str>, Option<&str>)| {
    let (query, key, user, chat) = input;
    let creds = Credentials::parse(Some(query), |name| match name {
        "X-API-Key" => key,
        "X-User-ID" => user,
        "X-Chat-ID" => chat,
        _ => None,
    });
    match creds.validate() {
        Ok((_, user_id, _)) => {
            assert!(!user_id.is_empty() && user_id.chars().count() <= 128);
        }
        Err(e) => {
            assert!(e.close == 4400 || e.close == 4401, "close code {}", e.close);
            assert!(!e.message.is_empty() && e.details.is_object());
        }
    }
});
