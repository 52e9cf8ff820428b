//! Reading tool calls out of a reply as it streams.
//!
//! The parser takes the reply's text deltas and says what they are: content for the user,
//! the start of a call (its id and name, as soon as the name is complete), or a piece of
//! the call's arguments (the JSON text as the model writes it, so the pieces join up to
//! exactly the arguments of the whole reply). Text that may be the start of a call marker
//! is held back until it is clear; text between and after calls that is only whitespace is
//! dropped. A marker followed by something that is not a call is given back as content.
//! Whole replies go through the same code ([`parse_reply`]), so a streamed and a whole
//! reply of the same text carry the same calls.

use super::{ToolCall, ToolFormat};

/// What a piece of reply text turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    /// A call begins; its name is known.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of the current call's arguments (JSON text).
    Arguments {
        index: usize,
        text: String,
    },
}

/// A whole reply: its content (text outside calls) and its calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedReply {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// The calls and content of a whole reply.
pub fn parse_reply(format: ToolFormat, text: &str) -> ParsedReply {
    let mut p = ToolCallParser::new(format);
    p.push(text);
    p.finish();
    p.into_reply()
}

/// Where the parser is.
#[derive(Debug)]
enum State {
    /// Content, watching for a call marker.
    Text,
    /// A call object (`{"name": …, "arguments": …}`).
    Object(ObjectScan),
    /// Hermes: after a call object, before `</tool_call>`.
    Closing,
    /// Mistral list: after `[TOOL_CALLS]`, before `[`.
    ListOpen,
    /// Mistral list: after an item, before `,` or `]`.
    ListNext,
    /// Mistral args form: the function's name, up to `[ARGS]` (or `[CALL_ID]`).
    Name,
    /// Mistral args form: the call id the model wrote, up to `[ARGS]`.
    CallId(String),
    /// Mistral args form: the arguments value.
    Value(ValueScan),
}

/// Turns a reply's text deltas into [`ToolEvent`]s.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    state: State,
    /// Text received and not yet consumed (the current structure, from its start).
    buf: String,
    /// The marker that opened the current call (given back as content if no call follows).
    opened_with: String,
    /// Whitespace-only content held until something else follows.
    held_space: String,
    /// Whether any content or call has been emitted (a Llama 3 call is a reply that starts
    /// with `{`).
    emitted: bool,
    /// The call being read has been announced ([`ToolEvent::CallStart`]).
    started: bool,
    /// How much of the current call's arguments (an index into `buf`) has been sent.
    args_sent: Option<usize>,
    reply: ParsedReply,
    events: Vec<ToolEvent>,
}

impl ToolCallParser {
    pub fn new(format: ToolFormat) -> ToolCallParser {
        ToolCallParser {
            format,
            state: State::Text,
            buf: String::new(),
            opened_with: String::new(),
            held_space: String::new(),
            emitted: false,
            started: false,
            args_sent: None,
            reply: ParsedReply::default(),
            events: Vec::new(),
        }
    }

    /// Takes the next delta; returns what can be said about the text so far.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        while self.step() {}
        std::mem::take(&mut self.events)
    }

    /// The reply ended: what was held back, as it stands.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        match std::mem::replace(&mut self.state, State::Text) {
            State::Text => {
                let rest = std::mem::take(&mut self.buf);
                self.content(&rest);
            }
            State::Object(scan) => {
                if self.started {
                    // Cut short (max_tokens): the call stands with what it has.
                    self.send_arguments(scan.args.map(|(s, _)| (s, self.buf.len())));
                    self.close_call();
                } else {
                    self.give_back();
                }
            }
            State::Value(scan) => {
                self.send_arguments(Some((scan.start.unwrap_or(0), self.buf.len())));
                self.close_call();
            }
            State::Name | State::CallId(_) => self.give_back(),
            State::Closing | State::ListOpen | State::ListNext => {}
        }
        self.buf.clear();
        if self.reply.calls.is_empty() {
            let space = std::mem::take(&mut self.held_space);
            self.emit_content(space);
        }
        std::mem::take(&mut self.events)
    }

    /// The whole reply so far.
    pub fn into_reply(self) -> ParsedReply {
        self.reply
    }

    /// Calls read so far.
    pub fn calls(&self) -> &[ToolCall] {
        &self.reply.calls
    }

    /// One move of the state machine; false when it needs more text.
    fn step(&mut self) -> bool {
        match std::mem::replace(&mut self.state, State::Text) {
            State::Text => self.text(),
            State::Object(mut scan) => {
                let outcome = scan.scan(&self.buf, self.format.arguments_key());
                if !self.started {
                    if let Some(name) = scan.name.clone() {
                        self.start_call(name, None);
                        self.args_sent = scan.args.map(|(s, _)| s);
                    }
                }
                match outcome {
                    Scan::More => {
                        if !scan.args_string {
                            self.send_arguments(scan.args.map(|(s, e)| (s, e.unwrap_or(scan.pos))));
                        }
                        self.state = State::Object(scan);
                        false
                    }
                    Scan::Done(end) => {
                        if !self.started {
                            // An object without a name is no call.
                            self.give_back_upto(end);
                            return true;
                        }
                        match scan.args {
                            Some((s, Some(e))) if scan.args_string => {
                                let text = serde_json::from_str::<String>(&self.buf[s..e])
                                    .unwrap_or_else(|_| self.buf[s..e].to_string());
                                self.arguments(text);
                            }
                            Some((s, e)) => self.send_arguments(Some((s, e.unwrap_or(end)))),
                            None => self.arguments("{}".into()),
                        }
                        self.close_call();
                        self.buf.drain(..end);
                        self.state = match self.format {
                            ToolFormat::Hermes => State::Closing,
                            ToolFormat::MistralList => State::ListNext,
                            _ => State::Text,
                        };
                        true
                    }
                    Scan::Invalid => {
                        if self.started {
                            self.close_call();
                            self.buf.drain(..scan.pos);
                        } else {
                            self.give_back_upto(scan.pos.max(1).min(self.buf.len()));
                        }
                        true
                    }
                }
            }
            State::Closing => {
                let rest = self.buf.trim_start();
                if rest.is_empty() {
                    self.state = State::Closing;
                    return false;
                }
                if let Some(after) = rest.strip_prefix("</tool_call>") {
                    self.buf = after.to_string();
                } else if "</tool_call>".starts_with(rest) {
                    self.state = State::Closing;
                    return false;
                }
                true
            }
            s @ (State::ListOpen | State::ListNext) => {
                let rest = self.buf.trim_start();
                let Some(c) = rest.chars().next() else {
                    self.state = s;
                    return false;
                };
                match c {
                    '[' | ',' => {
                        self.buf = rest[1..].to_string();
                        self.state = State::Object(ObjectScan::default());
                    }
                    // `[TOOL_CALLS]{…}`: one call, not in a list.
                    '{' => self.state = State::Object(ObjectScan::default()),
                    ']' => self.buf = rest[1..].to_string(),
                    _ => {}
                }
                true
            }
            State::Name => {
                let (args, id) = (self.buf.find("[ARGS]"), self.buf.find("[CALL_ID]"));
                match (args, id) {
                    (_, Some(i)) if args.is_none_or(|a| i < a) => {
                        let name = self.buf[..i].trim().to_string();
                        self.buf.drain(..i + "[CALL_ID]".len());
                        self.state = State::CallId(name);
                        true
                    }
                    (Some(a), _) => {
                        let name = self.buf[..a].trim().to_string();
                        self.buf.drain(..a + "[ARGS]".len());
                        self.start_call(name, None);
                        self.state = State::Value(ValueScan::default());
                        true
                    }
                    _ => {
                        self.state = State::Name;
                        false
                    }
                }
            }
            State::CallId(name) => match self.buf.find("[ARGS]") {
                Some(a) => {
                    let id = self.buf[..a].trim().to_string();
                    self.buf.drain(..a + "[ARGS]".len());
                    self.start_call(name, Some(id));
                    self.state = State::Value(ValueScan::default());
                    true
                }
                None => {
                    self.state = State::CallId(name);
                    false
                }
            },
            State::Value(mut scan) => match scan.scan(&self.buf) {
                Scan::More => {
                    if let Some(s) = scan.start {
                        self.send_arguments(Some((s, scan.pos)));
                    }
                    self.state = State::Value(scan);
                    false
                }
                Scan::Done(end) => {
                    self.send_arguments(Some((scan.start.unwrap_or(0), end)));
                    self.close_call();
                    self.buf.drain(..end);
                    true
                }
                Scan::Invalid => {
                    self.arguments("{}".into());
                    self.close_call();
                    true
                }
            },
        }
    }

    /// Content: emits all that cannot be the start of a marker; opens a call at a marker.
    fn text(&mut self) -> bool {
        let opener = match self.format {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Llama3 => "<|python_tag|>",
            ToolFormat::MistralList | ToolFormat::MistralArgs => "[TOOL_CALLS]",
        };
        if let Some(at) = self.buf.find(opener) {
            let before: String = self.buf[..at].to_string();
            self.content(&before);
            self.buf.drain(..at + opener.len());
            self.opened_with = opener.to_string();
            self.state = match self.format {
                ToolFormat::Hermes | ToolFormat::Llama3 => State::Object(ObjectScan::default()),
                ToolFormat::MistralList => State::ListOpen,
                ToolFormat::MistralArgs => State::Name,
            };
            return true;
        }
        // Llama 3 writes a call as a reply that is one JSON object.
        if self.format == ToolFormat::Llama3 && !self.emitted && self.reply.calls.is_empty() {
            let rest = self.buf.trim_start();
            if rest.starts_with('{') {
                // The space before it stays in `buf`: given back if this is no call.
                self.opened_with.clear();
                self.state = State::Object(ObjectScan::default());
                return true;
            }
            if rest.is_empty() {
                return false;
            }
        }
        let keep = held_prefix(&self.buf, opener);
        let out: String = self.buf.drain(..self.buf.len() - keep).collect();
        self.content(&out);
        false
    }

    /// Content text: whitespace at its end waits for what follows (dropped before a call,
    /// so a streamed and a whole reply split alike).
    fn content(&mut self, text: &str) {
        let body = text.trim_end();
        if !body.is_empty() {
            let mut out = std::mem::take(&mut self.held_space);
            out.push_str(body);
            self.emit_content(out);
        }
        self.held_space.push_str(&text[body.len()..]);
    }

    fn emit_content(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        self.emitted = true;
        self.reply.content.push_str(&text);
        self.events.push(ToolEvent::Content(text));
    }

    /// The marker and the text up to `end` were not a call: they are content.
    fn give_back_upto(&mut self, end: usize) {
        let end = (0..=end)
            .rev()
            .find(|&e| self.buf.is_char_boundary(e))
            .unwrap_or(0);
        let text = format!("{}{}", self.opened_with, &self.buf[..end]);
        self.buf.drain(..end);
        self.opened_with.clear();
        self.content(&text);
    }

    fn give_back(&mut self) {
        let end = self.buf.len();
        self.give_back_upto(end);
    }

    fn start_call(&mut self, name: String, id: Option<String>) {
        let id = id
            .filter(|id| self.format == ToolFormat::MistralArgs && valid_mistral_id(id))
            .unwrap_or_else(|| self.format.new_call_id());
        // Whitespace before a call is no content.
        self.held_space.clear();
        let index = self.reply.calls.len();
        self.reply.calls.push(ToolCall {
            id: id.clone(),
            name: name.clone(),
            arguments: String::new(),
        });
        self.started = true;
        self.emitted = true;
        self.args_sent = None;
        self.events.push(ToolEvent::CallStart { index, id, name });
    }

    /// Sends `buf[sent..end]` of the arguments whose value spans `range`.
    fn send_arguments(&mut self, range: Option<(usize, usize)>) {
        if !self.started {
            return;
        }
        let Some((start, end)) = range else { return };
        let from = *self.args_sent.get_or_insert(start);
        let end = end.min(self.buf.len());
        if end > from && self.buf.is_char_boundary(from) && self.buf.is_char_boundary(end) {
            let piece = self.buf[from..end].to_string();
            self.args_sent = Some(end);
            self.arguments(piece);
        }
    }

    fn arguments(&mut self, text: String) {
        let Some(call) = self.reply.calls.last_mut() else {
            return;
        };
        call.arguments.push_str(&text);
        let index = self.reply.calls.len() - 1;
        self.events.push(ToolEvent::Arguments { index, text });
    }

    /// The current call is complete; its arguments are never empty.
    fn close_call(&mut self) {
        if self.started
            && self
                .reply
                .calls
                .last()
                .is_some_and(|c| c.arguments.is_empty())
        {
            self.arguments("{}".into());
        }
        self.started = false;
        self.args_sent = None;
        self.opened_with.clear();
    }
}

/// Mistral's call ids: nine letters or digits.
fn valid_mistral_id(id: &str) -> bool {
    id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Length of the longest end of `text` that begins `marker` (held back: the marker may be
/// arriving).
fn held_prefix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    More,
    /// The value ends before this index.
    Done(usize),
    Invalid,
}

/// Reads a call object incrementally: its `name`, and where its arguments are.
#[derive(Debug, Default)]
struct ObjectScan {
    /// Next byte to read.
    pos: usize,
    depth: u32,
    in_str: bool,
    escaped: bool,
    /// Where the string being read at depth 1 began.
    str_start: usize,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    key: Option<String>,
    /// Where the current depth-1 value began.
    value_start: Option<usize>,
    /// The current depth-1 value is a number, `true`, … (ends at `,` or `}`).
    primitive: bool,
    name: Option<String>,
    /// Where the arguments value starts, and ends once read.
    args: Option<(usize, Option<usize>)>,
    /// The arguments are a JSON string (some models encode them): sent whole, decoded.
    args_string: bool,
}

impl ObjectScan {
    fn scan(&mut self, buf: &str, args_key: &str) -> Scan {
        let bytes = buf.as_bytes();
        while self.pos < bytes.len() {
            let i = self.pos;
            let b = bytes[i];
            self.pos += 1;
            if self.in_str {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_str = false;
                    if self.depth == 1 {
                        if self.expect_key {
                            self.key = serde_json::from_str(&buf[self.str_start..=i]).ok();
                            self.expect_key = false;
                        } else {
                            self.end_value(buf, i + 1, args_key);
                        }
                    }
                }
                continue;
            }
            if b.is_ascii_whitespace() {
                continue;
            }
            match (self.depth, b) {
                (0, b'{') => {
                    self.depth = 1;
                    self.expect_key = true;
                }
                (0, _) => return Scan::Invalid,
                (1, b':') => {}
                (1, b',') => {
                    if self.primitive {
                        self.end_value(buf, trimmed_end(buf, i), args_key);
                    }
                    self.expect_key = true;
                }
                (1, b'}') => {
                    if self.primitive {
                        self.end_value(buf, trimmed_end(buf, i), args_key);
                    }
                    return Scan::Done(i + 1);
                }
                (1, _) => {
                    if b == b'"' {
                        self.in_str = true;
                        self.str_start = i;
                    }
                    if !self.expect_key && self.value_start.is_none() {
                        self.value_start = Some(i);
                        self.primitive = !matches!(b, b'"' | b'{' | b'[');
                        if self.key.as_deref() == Some(args_key) {
                            self.args = Some((i, None));
                            self.args_string = b == b'"';
                        }
                    }
                    if matches!(b, b'{' | b'[') {
                        self.depth = 2;
                    }
                }
                (_, b'{' | b'[') => self.depth += 1,
                (_, b'}' | b']') => {
                    self.depth -= 1;
                    if self.depth == 1 {
                        self.end_value(buf, i + 1, args_key);
                    }
                }
                (_, b'"') => self.in_str = true,
                _ => {}
            }
        }
        Scan::More
    }

    fn end_value(&mut self, buf: &str, end: usize, args_key: &str) {
        let Some(start) = self.value_start.take() else {
            return;
        };
        self.primitive = false;
        match self.key.take().as_deref() {
            Some("name") => self.name = serde_json::from_str(&buf[start..end]).ok(),
            Some(k) if k == args_key || k == "arguments" || k == "parameters" => {
                if self.args.is_none() {
                    self.args_string = buf.as_bytes()[start] == b'"';
                }
                self.args = Some((start, Some(end)));
            }
            _ => {}
        }
    }
}

/// `i` moved back over whitespace before it.
fn trimmed_end(buf: &str, i: usize) -> usize {
    i - (buf[..i].len() - buf[..i].trim_end().len())
}

/// Reads one JSON object or array incrementally (Mistral's `[ARGS]` value).
#[derive(Debug, Default)]
struct ValueScan {
    pos: usize,
    start: Option<usize>,
    depth: u32,
    in_str: bool,
    escaped: bool,
}

impl ValueScan {
    fn scan(&mut self, buf: &str) -> Scan {
        let bytes = buf.as_bytes();
        while self.pos < bytes.len() {
            let i = self.pos;
            let b = bytes[i];
            self.pos += 1;
            if self.in_str {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_str = false;
                }
                continue;
            }
            match b {
                _ if self.start.is_none() && b.is_ascii_whitespace() => {}
                b'{' | b'[' => {
                    self.start.get_or_insert(i);
                    self.depth += 1;
                }
                _ if self.start.is_none() => return Scan::Invalid,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Scan::Done(i + 1);
                    }
                }
                b'"' => self.in_str = true,
                _ => {}
            }
        }
        Scan::More
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `n` characters; returns the events joined up and the
    /// reply.
    fn stream(format: ToolFormat, text: &str, n: usize) -> (Vec<ToolEvent>, ParsedReply) {
        let mut p = ToolCallParser::new(format);
        let chars: Vec<char> = text.chars().collect();
        let mut events = Vec::new();
        for piece in chars.chunks(n) {
            events.extend(p.push(&piece.iter().collect::<String>()));
        }
        events.extend(p.finish());
        (events, p.into_reply())
    }

    /// The calls as the streamed events rebuild them.
    fn rebuilt(events: &[ToolEvent]) -> (String, Vec<(String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for e in events {
            match e {
                ToolEvent::Content(t) => content.push_str(t),
                ToolEvent::CallStart { index, name, .. } => {
                    assert_eq!(*index, calls.len());
                    calls.push((name.clone(), String::new()));
                }
                ToolEvent::Arguments { index, text } => calls[*index].1.push_str(text),
            }
        }
        (content, calls)
    }

    fn check(format: ToolFormat, text: &str, content: &str, calls: &[(&str, &str)]) {
        for n in [1, 2, 3, 7, 1000] {
            let (events, reply) = stream(format, text, n);
            let (c, k) = rebuilt(&events);
            let want: Vec<(String, String)> = calls
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(c, content, "{format:?} content, pieces of {n}: {text:?}");
            assert_eq!(k, want, "{format:?} calls, pieces of {n}: {text:?}");
            assert_eq!(reply.content, content);
            let whole: Vec<(String, String)> = reply
                .calls
                .iter()
                .map(|c| (c.name.clone(), c.arguments.clone()))
                .collect();
            assert_eq!(whole, want);
        }
        let whole = parse_reply(format, text);
        assert_eq!(whole.calls.len(), calls.len());
    }

    #[test]
    fn hermes() {
        let f = ToolFormat::Hermes;
        check(f, "Hello there.", "Hello there.", &[]);
        check(
            f,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"n\": [1, {\"x\": \"}\"}]}}\n</tool_call>",
            "",
            &[("get_weather", "{\"city\": \"Paris\", \"n\": [1, {\"x\": \"}\"}]}")],
        );
        // Text first; two calls; arguments before the name; a string with escapes.
        check(
            f,
            "Let me look.\n<tool_call>\n{\"arguments\": {\"q\": \"a\\\"b\"}, \"name\": \"search\"}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n",
            "Let me look.",
            &[("search", "{\"q\": \"a\\\"b\"}"), ("now", "{}")],
        );
        // No arguments at all; arguments as an encoded string.
        check(
            f,
            "<tool_call>{\"name\": \"now\"}</tool_call>",
            "",
            &[("now", "{}")],
        );
        check(
            f,
            "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>",
            "",
            &[("f", "{\"a\": 1}")],
        );
        // A marker with no call after it is content.
        check(
            f,
            "I would write <tool_call> here.",
            "I would write <tool_call> here.",
            &[],
        );
        check(f, "a <tool_ca", "a <tool_ca", &[]);
        // Unicode in content and arguments.
        check(
            f,
            "Voilà ✓<tool_call>{\"name\": \"é\", \"arguments\": {\"v\": \"ü✓\"}}</tool_call>",
            "Voilà ✓",
            &[("é", "{\"v\": \"ü✓\"}")],
        );
    }

    #[test]
    fn cut_short() {
        // max_tokens mid-call: the call stands with what it has.
        let (_, reply) = stream(
            ToolFormat::Hermes,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2",
            3,
        );
        assert_eq!(reply.calls.len(), 1);
        assert_eq!(reply.calls[0].arguments, "{\"a\": [1, 2");
        // Mid-name: not a call yet, so content.
        let (_, reply) = stream(ToolFormat::Hermes, "<tool_call>\n{\"na", 2);
        assert!(reply.calls.is_empty());
        assert_eq!(reply.content, "<tool_call>\n{\"na");
    }

    #[test]
    fn llama3() {
        let f = ToolFormat::Llama3;
        check(
            f,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            "",
            &[("get_weather", "{\"city\": \"Oslo\"}")],
        );
        check(
            f,
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"n\": 3}}",
            "",
            &[("f", "{\"n\": 3}")],
        );
        // A JSON answer that is no call stays content.
        check(f, " {\"answer\": 42}", " {\"answer\": 42}", &[]);
        check(f, "The answer is {x}.", "The answer is {x}.", &[]);
    }

    #[test]
    fn mistral() {
        check(
            ToolFormat::MistralList,
            "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {\"y\": \"]\"}}]",
            "",
            &[("a", "{\"x\": 1}"), ("b", "{\"y\": \"]\"}")],
        );
        check(
            ToolFormat::MistralArgs,
            "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Rome\"}[TOOL_CALLS]now[CALL_ID]abc123XYZ[ARGS]{}",
            "",
            &[("get_weather", "{\"city\": \"Rome\"}"), ("now", "{}")],
        );
        let r = parse_reply(
            ToolFormat::MistralArgs,
            "[TOOL_CALLS]now[CALL_ID]abc123XYZ[ARGS]{}",
        );
        assert_eq!(r.calls[0].id, "abc123XYZ");
    }
}
