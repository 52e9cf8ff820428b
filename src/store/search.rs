//! Full-text search of one user's chats: titles and message text, with the database's own
//! engine (SQLite FTS5 with the Porter stemmer; PostgreSQL `tsvector` with the `english`
//! configuration — see the `m20261206_000002_search` migration). Every word of the query
//! must occur (stemmed); matching chats come newest first, each with a snippet of its newest
//! matching message (or of its title).

use std::collections::HashMap;

use sea_orm::sea_query::Expr;
use sea_orm::{Condition, ConnectionTrait, DatabaseBackend, FromQueryResult, Statement, Value};
use uuid::Uuid;

use super::chats::chat_from_row;
use super::{StoreError, TenantScope};
use crate::domain::{Chat, Page, PageRequest};

/// Marks a match's start and end in snippets as the databases write them (Unicode private
/// use characters, which chat text does not carry); [`highlighted`] turns them into ranges.
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

/// A chat that matches a search, with where.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMatch {
    pub chat: Chat,
    /// The newest matching message; `None` when only the title matches.
    pub message_id: Option<Uuid>,
    /// A short passage around the match(es), plain text.
    pub snippet: String,
    /// The matched words in `snippet`, as character ranges `[start, end)`.
    pub highlights: Vec<(usize, usize)>,
}

/// A search query: the words of the text, each required. `None` when it has no words.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    text: String,
    words: Vec<String>,
}

impl SearchQuery {
    /// Words are runs of letters and digits; everything else separates them (so query
    /// syntax characters cannot reach the database's parser).
    pub fn parse(text: &str) -> Option<SearchQuery> {
        let words: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        (!words.is_empty()).then(|| SearchQuery {
            text: words.join(" "),
            words,
        })
    }

    /// FTS5's form: each word a quoted string (stemmed by the tokenizer), all required.
    fn fts5(&self) -> String {
        self.words
            .iter()
            .map(|w| format!("\"{w}\""))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// Removes the match markers; returns the text and the marked ranges (in characters).
fn highlighted(marked: &str) -> (String, Vec<(usize, usize)>) {
    let mut text = String::with_capacity(marked.len());
    let mut ranges = Vec::new();
    let (mut n, mut start) = (0usize, None);
    for c in marked.chars() {
        match c {
            OPEN => start = Some(n),
            CLOSE => {
                if let Some(s) = start.take() {
                    if n > s {
                        ranges.push((s, n));
                    }
                }
            }
            c => {
                text.push(c);
                n += 1;
            }
        }
    }
    (text, ranges)
}

#[derive(Debug, FromQueryResult)]
struct Hit {
    chat_id: Uuid,
    message_id: Option<Uuid>,
    seq: i64,
    snippet: String,
}

/// `$from, $from+1, …` for `n` values.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl TenantScope<'_> {
    /// The chats of `user_id` that match `query`, newest first, each with its best snippet.
    pub async fn search_chats(
        &self,
        user_id: &str,
        query: &SearchQuery,
        page: PageRequest,
    ) -> Result<Page<ChatMatch>, StoreError> {
        let backend = self.db.get_database_backend();
        let matches = match backend {
            DatabaseBackend::Postgres => Expr::cust_with_values(
                "(to_tsvector('english'::regconfig, COALESCE(chats.title, '')) \
                   @@ plainto_tsquery('english'::regconfig, $1) \
                 OR chats.id IN (SELECT m.chat_id FROM messages m \
                   WHERE m.tenant_id = $2 \
                   AND to_tsvector('english'::regconfig, m.content) \
                       @@ plainto_tsquery('english'::regconfig, $1)))",
                [Value::from(query.text.clone()), Value::from(self.tenant)],
            ),
            _ => Expr::cust_with_values(
                "chats.id IN (SELECT d.chat_id FROM search_fts \
                   JOIN search_docs d ON d.id = search_fts.rowid \
                   WHERE search_fts MATCH ?)",
                [Value::from(query.fts5())],
            ),
        };
        let (rows, total) = self
            .user_chats(user_id, Condition::all().add(matches), page)
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|c| c.id).collect();
        let mut best: HashMap<Uuid, Hit> = HashMap::new();
        if !ids.is_empty() {
            for hit in self.hits(backend, query, &ids).await? {
                // The newest matching message; the title (seq 0) only when no message matches.
                match best.get(&hit.chat_id) {
                    Some(b) if b.seq >= hit.seq => {}
                    _ => {
                        best.insert(hit.chat_id, hit);
                    }
                }
            }
        }
        let items = rows
            .into_iter()
            .map(|row| {
                let chat = chat_from_row(row)?;
                let (message_id, snippet, highlights) = match best.remove(&chat.id) {
                    Some(hit) => {
                        let (text, ranges) = highlighted(&hit.snippet);
                        (hit.message_id, text, ranges)
                    }
                    None => (None, String::new(), Vec::new()),
                };
                Ok(ChatMatch {
                    chat,
                    message_id,
                    snippet,
                    highlights,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Page {
            items,
            total,
            offset: page.offset,
            limit: page.limit,
        })
    }

    /// The matching documents of `chats` (already this tenant's), with marked snippets.
    async fn hits(
        &self,
        backend: DatabaseBackend,
        query: &SearchQuery,
        chats: &[Uuid],
    ) -> Result<Vec<Hit>, StoreError> {
        let ids = chats.iter().map(|&id| Value::from(id));
        let (sql, values): (String, Vec<Value>) = match backend {
            DatabaseBackend::Postgres => {
                let list = placeholders(3, chats.len());
                // The snippet is made for the newest matching message of each chat only
                // (`ts_headline` reads the whole text).
                let sql = format!(
                    "WITH q AS (SELECT plainto_tsquery('english'::regconfig, $1) AS q) \
                     SELECT x.chat_id, x.message_id, x.seq, \
                       ts_headline('english'::regconfig, x.body, q.q, \
                         'StartSel={OPEN}, StopSel={CLOSE}, MaxWords=24, MinWords=8') AS snippet \
                     FROM q, ( \
                       (SELECT DISTINCT ON (m.chat_id) m.chat_id, m.id AS message_id, \
                         m.seq, m.content AS body \
                       FROM messages m, q \
                       WHERE m.tenant_id = $2 AND m.chat_id IN ({list}) \
                         AND to_tsvector('english'::regconfig, m.content) @@ q.q \
                       ORDER BY m.chat_id, m.seq DESC) \
                       UNION ALL \
                       (SELECT c.id, NULL, 0, COALESCE(c.title, '') \
                       FROM chats c, q \
                       WHERE c.tenant_id = $2 AND c.id IN ({list}) \
                         AND to_tsvector('english'::regconfig, COALESCE(c.title, '')) @@ q.q) \
                     ) x"
                );
                let mut values = vec![Value::from(query.text.clone()), Value::from(self.tenant)];
                values.extend(ids);
                (sql, values)
            }
            _ => {
                let list = placeholders(2, chats.len());
                let sql = format!(
                    "SELECT d.chat_id AS chat_id, d.message_id AS message_id, \
                       COALESCE(m.seq, 0) AS seq, \
                       snippet(search_fts, 0, '{OPEN}', '{CLOSE}', '…', 16) AS snippet \
                     FROM search_fts JOIN search_docs d ON d.id = search_fts.rowid \
                     LEFT JOIN messages m ON m.id = d.message_id \
                     WHERE search_fts MATCH $1 AND d.chat_id IN ({list})"
                );
                let mut values = vec![Value::from(query.fts5())];
                values.extend(ids);
                (sql, values)
            }
        };
        let stmt = Statement::from_sql_and_values(backend, sql, values);
        Ok(Hit::find_by_statement(stmt).all(self.db).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_keep_words_only() {
        let q = SearchQuery::parse(r#"  "paris" OR NEAR(x*) -- café's  "#).unwrap();
        assert_eq!(q.words, ["paris", "OR", "NEAR", "x", "café", "s"]);
        assert_eq!(
            q.fts5(),
            r#""paris" AND "OR" AND "NEAR" AND "x" AND "café" AND "s""#
        );
        assert_eq!(SearchQuery::parse(" *()\"- "), None);
    }

    #[test]
    fn markers_become_character_ranges() {
        let marked = format!("la {OPEN}capitale{CLOSE} de la {OPEN}Fr{CLOSE}ance é");
        let (text, ranges) = highlighted(&marked);
        assert_eq!(text, "la capitale de la France é");
        assert_eq!(ranges, [(3, 11), (18, 20)]);
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(chars[3..11].iter().collect::<String>(), "capitale");
        // An unmatched or empty marker adds nothing.
        assert_eq!(
            highlighted(&format!("{CLOSE}a{OPEN}{CLOSE}b")),
            ("ab".into(), vec![])
        );
    }
}
