//! Attention state kept between a chat's turns.
//!
//! Every turn of a chat sends the whole conversation again, so without help the time to the
//! first token grows with the history. After a reply the engine keeps the sequence's KV cache
//! and the token ids it covers, keyed by chat; the next turn's prompt almost always starts
//! with those tokens, and only the rest is run through the model. The match is on token ids,
//! never on the chat's identity alone: an edited system prompt, a deleted turn or a window
//! that slid past old messages simply shares a shorter prefix (or none), so a stale entry
//! costs speed, never correctness.
//!
//! Entries are weighed in bytes of KV memory and evicted least-recently-used past the
//! configured total. An entry is taken out while its chat's turn runs (one reply per chat
//! runs at a time) and put back, with the new tokens, when it ends.

use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::model::KvCache;

/// A chat's kept attention state.
pub struct Entry {
    /// The tokens whose keys and values `cache` holds, in order.
    pub tokens: Vec<u32>,
    pub cache: KvCache,
}

/// moka hands out clones of a value and may hold one itself for a while, so an entry is
/// moved out of a shared slot rather than unwrapped.
type Slot = Arc<Mutex<Option<Entry>>>;

/// Kept KV caches by chat; cheap to clone (the handle invalidates, the engine thread uses).
#[derive(Clone)]
pub struct PrefixCache {
    entries: Option<moka::sync::Cache<Uuid, Slot>>,
}

impl PrefixCache {
    /// Holds at most `max_bytes` of KV memory; 0 keeps nothing.
    pub fn new(max_bytes: u64) -> PrefixCache {
        let entries = (max_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, slot: &Slot| {
                    let bytes = slot
                        .lock()
                        .map_or(0, |e| e.as_ref().map_or(0, |e| e.cache.bytes()));
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build()
        });
        PrefixCache { entries }
    }

    /// Takes the chat's entry out (the turn that uses it puts it back).
    pub fn take(&self, chat: &Uuid) -> Option<Entry> {
        let slot = self.entries.as_ref()?.remove(chat)?;
        let mut entry = slot.lock().unwrap_or_else(|e| e.into_inner());
        entry.take()
    }

    pub fn put(&self, chat: Uuid, entry: Entry) {
        if let Some(entries) = &self.entries {
            entries.insert(chat, Arc::new(Mutex::new(Some(entry))));
        }
    }

    /// Drops the chat's entry (the chat was edited or deleted: its memory is better spent on
    /// others).
    pub fn forget(&self, chat: &Uuid) {
        if let Some(entries) = &self.entries {
            entries.invalidate(chat);
        }
    }
}

/// How many leading tokens `a` and `b` share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[9], &[1]), 0);
    }
}
