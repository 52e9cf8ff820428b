//! Offset pagination, shared by every listing.

/// Sort direction of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Asc,
    Desc,
}

/// A validated window into a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub offset: u64,
    pub limit: u64,
    pub order: Order,
}

/// One window of a listing plus what a client needs to fetch the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
}

impl<T> Page<T> {
    /// True when items exist past this window.
    pub fn has_more(&self) -> bool {
        self.offset.saturating_add(self.items.len() as u64) < self.total
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            total: self.total,
            offset: self.offset,
            limit: self.limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize, total: u64, offset: u64) -> Page<()> {
        Page {
            items: vec![(); n],
            total,
            offset,
            limit: 50,
        }
    }

    #[test]
    fn has_more_arithmetic() {
        assert!(page(50, 147, 0).has_more());
        assert!(page(50, 147, 50).has_more());
        assert!(!page(47, 147, 100).has_more());
        assert!(!page(0, 147, 147).has_more());
        assert!(!page(0, 147, 1000).has_more());
        assert!(!page(0, 0, 0).has_more());
        assert!(!page(0, 10, u64::MAX).has_more());
    }
}
