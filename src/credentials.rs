//! API keys: how they are made, shown and recognised.
//!
//! A generated tenant key is `cfk_` (an admin key `cfa_`) + 8 random characters (the public prefix an operator sees in
//! listings) + 32 more random characters, all base62: about 238 bits of randomness. Only its
//! SHA-256 is stored. A fast hash is right here: unlike passwords, keys are long random
//! strings, so there is nothing to brute-force.

use rand::Rng;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const KEY_TAG: &str = "cfk_";
/// Admin keys look different at a glance (and to secret scanners); what makes one an admin
/// key is the table it is stored in, not its text.
const ADMIN_KEY_TAG: &str = "cfa_";
/// User-scoped tokens (`POST /api/v1/tokens`).
const USER_TOKEN_TAG: &str = "cfu_";
/// Shortest operator-chosen key (`CONFAB_BOOTSTRAP_API_KEY`).
pub const MIN_CUSTOM_KEY_LEN: usize = 24;
/// Longest key accepted anywhere.
pub const MAX_KEY_LEN: usize = 256;

/// A key as shown once to its owner, with the parts that are stored.
#[derive(Clone)]
pub struct IssuedKey {
    /// The full secret; shown once, never stored.
    pub secret: String,
    pub prefix: String,
    pub hash: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn random_chars(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// SHA-256 of the key, lower-case hex: the value stored and looked up.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Makes a fresh random tenant key.
pub fn generate() -> IssuedKey {
    generate_tagged(KEY_TAG)
}

/// Makes a fresh random admin key.
pub fn generate_admin() -> IssuedKey {
    generate_tagged(ADMIN_KEY_TAG)
}

/// Makes a fresh random user-scoped token.
pub fn generate_user_token() -> IssuedKey {
    generate_tagged(USER_TOKEN_TAG)
}

fn generate_tagged(tag: &str) -> IssuedKey {
    let secret = format!("{tag}{}{}", random_chars(8), random_chars(32));
    let prefix = secret[..tag.len() + 8].to_string();
    let hash = hash_key(&secret);
    IssuedKey {
        secret,
        prefix,
        hash,
    }
}

/// Accepts an operator-chosen key: printable ASCII without spaces, long enough that its
/// shown prefix (first 8 characters) leaves plenty unknown.
pub fn custom(secret: &str) -> Result<IssuedKey, String> {
    if secret.len() < MIN_CUSTOM_KEY_LEN || secret.len() > MAX_KEY_LEN {
        return Err(format!(
            "an API key must be {MIN_CUSTOM_KEY_LEN} to {MAX_KEY_LEN} characters long, got {}",
            secret.len()
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an API key may contain only printable ASCII characters without spaces".into());
    }
    let prefix = if secret.starts_with(KEY_TAG) || secret.starts_with(ADMIN_KEY_TAG) {
        &secret[..12]
    } else {
        &secret[..8]
    };
    Ok(IssuedKey {
        secret: secret.to_string(),
        prefix: prefix.to_string(),
        hash: hash_key(secret),
    })
}

/// Cheap shape check before any lookup: rejects what cannot be a key of ours.
pub fn plausible(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_unique_and_prefixed() {
        let a = generate();
        let b = generate();
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), 44);
        assert!(a.secret.starts_with(&a.prefix));
        assert_eq!(a.prefix.len(), 12);
        assert_eq!(a.hash, hash_key(&a.secret));
        assert_eq!(a.hash.len(), 64);
        assert!(!format!("{a:?}").contains(&a.secret));
        let admin = generate_admin();
        assert!(admin.secret.starts_with("cfa_"));
        assert_eq!(admin.prefix.len(), 12);
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn custom_keys_are_checked() {
        assert!(custom("short").is_err());
        assert!(custom("has a space in it somewhere ok").is_err());
        let k = custom("ci-known-key-0123456789abcdef").unwrap();
        assert_eq!(k.prefix, "ci-known");
    }
}
