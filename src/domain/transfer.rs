//! A chat taken out of confab or brought in: the imported form, checked once into a tree the
//! store can write without further questions, and the Markdown form of a branch.

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::{Chat, Message, MessageStatus, NewChat, Role, ValidationError};

/// One message as an import gives it (already typed; not yet checked against the others).
#[derive(Debug, Clone)]
pub struct ImportMessage {
    /// The source's id for it; what `parent_id` and the active id refer to.
    pub id: Option<String>,
    pub parent_id: Option<String>,
    pub role: Role,
    pub content: String,
    pub metadata: Map<String, Value>,
    pub status: Option<MessageStatus>,
    pub created_at: Option<DateTime<Utc>>,
}

/// A message placed in the tree to write: its parent is an earlier message of the list.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedMessage {
    pub parent: Option<usize>,
    pub depth: i64,
    pub role: Role,
    pub content: String,
    pub metadata: Map<String, Value>,
    pub status: MessageStatus,
    pub created_at: Option<DateTime<Utc>>,
}

/// A whole chat to create: parents before children, the active leaf an index.
#[derive(Debug, Clone)]
pub struct PlannedChat {
    pub chat: NewChat,
    pub messages: Vec<PlannedMessage>,
    pub active: Option<usize>,
}

fn invalid(field: String, message: String, rule: Value) -> ValidationError {
    ValidationError {
        field,
        message,
        rule,
    }
}

/// Checks an import and orders it into a tree.
///
/// Messages with ids form a tree through `parent_id` (a missing or null parent: a root), in
/// any order; without ids (an OpenAI-style `messages` list) they form one branch in list
/// order. The active leaf is `active_id`, else the newest leaf (the last message of the
/// list that has no children). A streaming message cannot be imported (nothing will finish
/// it): it becomes `interrupted`.
pub fn plan_import(
    chat: NewChat,
    messages: Vec<ImportMessage>,
    active_id: Option<String>,
    max_messages: usize,
    max_content_chars: usize,
) -> Result<PlannedChat, ValidationError> {
    if messages.len() > max_messages {
        return Err(invalid(
            "messages".into(),
            format!(
                "holds {} messages; at most {max_messages} can be imported into one chat",
                messages.len()
            ),
            json!({"max_items": max_messages}),
        ));
    }
    let with_ids = messages.iter().filter(|m| m.id.is_some()).count();
    if with_ids != 0 && with_ids != messages.len() {
        let i = messages.iter().position(|m| m.id.is_none()).unwrap_or(0);
        return Err(invalid(
            format!("messages[{i}].id"),
            "is missing: give every message an id (a tree), or none (one branch in list \
             order)"
                .into(),
            json!({"required": "all or none"}),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let chars = m.content.chars().count();
        if chars > max_content_chars {
            return Err(invalid(
                format!("messages[{i}].content"),
                format!("is {chars} characters; at most {max_content_chars} are accepted"),
                json!({"max_chars": max_content_chars}),
            ));
        }
        super::reject_nul(&format!("messages[{i}].content"), &m.content)?;
        if with_ids == 0 && m.parent_id.is_some() {
            return Err(invalid(
                format!("messages[{i}].parent_id"),
                "needs message ids: a parent is named by its id".into(),
                json!({"requires": "id"}),
            ));
        }
    }
    // Source index → parent's source index.
    let mut parent_of: Vec<Option<usize>> = Vec::with_capacity(messages.len());
    if with_ids == 0 {
        parent_of.extend((0..messages.len()).map(|i| i.checked_sub(1)));
    } else {
        let mut index = std::collections::HashMap::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let id = m.id.as_deref().unwrap_or_default();
            if index.insert(id, i).is_some() {
                return Err(invalid(
                    format!("messages[{i}].id"),
                    format!("{id:?} is given to two messages"),
                    json!({"unique": true}),
                ));
            }
        }
        for (i, m) in messages.iter().enumerate() {
            parent_of.push(match m.parent_id.as_deref() {
                None => None,
                Some(p) => Some(*index.get(p).ok_or_else(|| {
                    invalid(
                        format!("messages[{i}].parent_id"),
                        format!("{p:?} is not the id of a message of this import"),
                        json!({"references": "messages[].id"}),
                    )
                })?),
            });
        }
    }
    // Parents before children, otherwise in list order: the next message written is always
    // the earliest in the list whose parent is written, so a list already in order (an
    // export's) keeps it. A message never reached is on a cycle.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); messages.len()];
    let mut ready = std::collections::BinaryHeap::new();
    for (i, p) in parent_of.iter().enumerate() {
        match p {
            Some(p) => children[*p].push(i),
            None => ready.push(std::cmp::Reverse(i)),
        }
    }
    let mut order = Vec::with_capacity(messages.len());
    let mut depth = vec![0i64; messages.len()];
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        depth[i] = parent_of[i].map_or(1, |p| depth[p] + 1);
        order.push(i);
        ready.extend(children[i].iter().map(|&c| std::cmp::Reverse(c)));
    }
    if order.len() != messages.len() {
        let i = (0..messages.len())
            .find(|i| !order.contains(i))
            .unwrap_or(0);
        return Err(invalid(
            format!("messages[{i}].parent_id"),
            "forms a cycle: following parents from this message never reaches a root".into(),
            json!({"acyclic": true}),
        ));
    }
    let mut position = vec![0usize; messages.len()];
    for (at, &i) in order.iter().enumerate() {
        position[i] = at;
    }
    let active_source = match active_id {
        Some(id) => Some(
            messages
                .iter()
                .position(|m| m.id.as_deref() == Some(id.as_str()))
                .ok_or_else(|| {
                    invalid(
                        "active_message_id".into(),
                        format!("{id:?} is not the id of a message of this import"),
                        json!({"references": "messages[].id"}),
                    )
                })?,
        ),
        None => (0..messages.len()).rev().find(|&i| children[i].is_empty()),
    };
    let mut by_source: Vec<Option<ImportMessage>> = messages.into_iter().map(Some).collect();
    let planned = order
        .iter()
        .map(|&i| {
            let m = by_source[i].take().expect("each message is placed once");
            PlannedMessage {
                parent: parent_of[i].map(|p| position[p]),
                depth: depth[i],
                role: m.role,
                content: m.content,
                metadata: m.metadata,
                status: match m.status {
                    None => MessageStatus::Complete,
                    Some(MessageStatus::Streaming) => MessageStatus::Interrupted,
                    Some(s) => s,
                },
                created_at: m.created_at,
            }
        })
        .collect();
    Ok(PlannedChat {
        chat,
        messages: planned,
        active: active_source.map(|i| position[i]),
    })
}

/// The branch as Markdown: the title, then each message under its role's heading.
pub fn branch_markdown(chat: &Chat, branch: &[Message]) -> String {
    let mut out = String::new();
    let title = chat.title.as_deref().unwrap_or("Untitled chat");
    out.push_str(&format!("# {}\n\n", one_line(title)));
    if let Some(system) = chat
        .config
        .system_prompt
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        out.push_str("## System\n\n");
        out.push_str(system.trim_end());
        out.push_str("\n\n");
    }
    for m in branch {
        let who = match m.role {
            Role::User => "User",
            Role::Assistant => "Assistant",
            Role::System => "System",
        };
        let note = match m.status {
            MessageStatus::Complete | MessageStatus::Streaming => String::new(),
            other => format!(" ({})", other.as_str()),
        };
        out.push_str(&format!("## {who}{note}\n\n"));
        out.push_str(m.content.trim_end());
        out.push_str("\n\n");
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

/// A title on one line (a heading ends at the line's end).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: Option<&str>, parent: Option<&str>, role: Role, text: &str) -> ImportMessage {
        ImportMessage {
            id: id.map(str::to_string),
            parent_id: parent.map(str::to_string),
            role,
            content: text.into(),
            metadata: Map::new(),
            status: None,
            created_at: None,
        }
    }

    fn plan(
        messages: Vec<ImportMessage>,
        active: Option<&str>,
    ) -> Result<PlannedChat, ValidationError> {
        plan_import(
            NewChat::default(),
            messages,
            active.map(str::to_string),
            100,
            50,
        )
    }

    #[test]
    fn a_list_without_ids_is_one_branch() {
        let p = plan(
            vec![
                msg(None, None, Role::User, "a"),
                msg(None, None, Role::Assistant, "b"),
                msg(None, None, Role::User, "c"),
            ],
            None,
        )
        .unwrap();
        let parents: Vec<_> = p.messages.iter().map(|m| m.parent).collect();
        assert_eq!(parents, [None, Some(0), Some(1)]);
        assert_eq!(
            p.messages.iter().map(|m| m.depth).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(p.active, Some(2));
        assert!(p
            .messages
            .iter()
            .all(|m| m.status == MessageStatus::Complete));
    }

    #[test]
    fn a_tree_in_any_order_is_written_parents_first() {
        // c2 answers u1 again; u1 comes after its children in the list.
        let p = plan(
            vec![
                msg(Some("a1"), Some("u1"), Role::Assistant, "first"),
                msg(Some("a2"), Some("u1"), Role::Assistant, "second"),
                msg(Some("u1"), None, Role::User, "q"),
            ],
            None,
        )
        .unwrap();
        let texts: Vec<_> = p.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["q", "first", "second"]);
        // A list in order keeps it, branches interleaved as written.
        let kept = plan(
            vec![
                msg(Some("u"), None, Role::User, "u"),
                msg(Some("a"), Some("u"), Role::Assistant, "a"),
                msg(Some("b"), Some("u"), Role::Assistant, "b"),
                msg(Some("v"), Some("a"), Role::User, "v"),
            ],
            None,
        )
        .unwrap();
        let texts: Vec<_> = kept.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["u", "a", "b", "v"]);
        assert_eq!(kept.active, Some(3));
        assert_eq!(p.messages[1].parent, Some(0));
        assert_eq!(p.messages[2].parent, Some(0));
        // The newest leaf in list order (a2) is active unless one is named.
        assert_eq!(p.active, Some(2));
        let named = plan(
            vec![
                msg(Some("u1"), None, Role::User, "q"),
                msg(Some("a1"), Some("u1"), Role::Assistant, "first"),
                msg(Some("a2"), Some("u1"), Role::Assistant, "second"),
            ],
            Some("a1"),
        )
        .unwrap();
        assert_eq!(named.active, Some(1));
    }

    #[test]
    fn bad_imports_name_the_message() {
        let field = |r: Result<PlannedChat, ValidationError>| r.unwrap_err().field;
        assert_eq!(
            field(plan(
                vec![
                    msg(Some("x"), None, Role::User, "a"),
                    msg(None, None, Role::User, "b")
                ],
                None
            )),
            "messages[1].id"
        );
        assert_eq!(
            field(plan(
                vec![msg(Some("x"), Some("nope"), Role::User, "a")],
                None
            )),
            "messages[0].parent_id"
        );
        assert_eq!(
            field(plan(
                vec![
                    msg(Some("x"), None, Role::User, "a"),
                    msg(Some("x"), None, Role::User, "b")
                ],
                None
            )),
            "messages[1].id"
        );
        assert_eq!(
            field(plan(
                vec![
                    msg(Some("r"), None, Role::User, "a"),
                    msg(Some("x"), Some("y"), Role::User, "b"),
                    msg(Some("y"), Some("x"), Role::User, "c"),
                ],
                None
            )),
            "messages[1].parent_id"
        );
        assert_eq!(
            field(plan(vec![msg(None, Some("x"), Role::User, "a")], None)),
            "messages[0].parent_id"
        );
        assert_eq!(
            field(plan(
                vec![msg(None, None, Role::User, &"x".repeat(51))],
                None
            )),
            "messages[0].content"
        );
        assert_eq!(
            field(plan(vec![msg(None, None, Role::User, "a\0b")], None)),
            "messages[0].content"
        );
        assert_eq!(
            field(plan(vec![msg(Some("a"), None, Role::User, "a")], Some("b"))),
            "active_message_id"
        );
        let many = (0..101).map(|_| msg(None, None, Role::User, "a")).collect();
        assert_eq!(field(plan(many, None)), "messages");
    }
}
