//! GBNF, the grammar format of llama.cpp (`grammar` on llama-server's API), read and written
//! out as the Lark dialect our grammar engine compiles.
//!
//! Users bring GBNF grammars from llama.cpp's `grammars/` folder and from tools that generate
//! them; llguidance reads only its Lark dialect. The two describe the same languages with
//! different spelling, so the translation is syntactic: `name ::= …` becomes `name: …`, `root`
//! becomes `start`, character classes and `.` become regular expressions, strings are
//! re-quoted, repetitions (`*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`) keep their meaning, and
//! special tokens (`<[id]>`, `<|name|>`) pass through. Parsing follows llama.cpp's
//! `llama_grammar_parser`: a rule ends at the end of its line unless inside parentheses or
//! after a `|`; `#` starts a comment.
//!
//! Rules made only of text (strings, classes, other such rules, no recursion) are written as
//! Lark terminals, one regular expression each, as llguidance's own converter does: the
//! grammar engine then scans them as lexemes instead of parsing them character by character,
//! which keeps the per-token mask cheap.
//!
//! Errors name the line and column and what was expected, because a grammar is hand-written
//! text and its author needs to find the mistake.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// Converts a GBNF grammar to llguidance's Lark; the error says where and what is wrong.
pub fn to_lark(gbnf: &str) -> Result<String, String> {
    let rules = Parser::new(gbnf).grammar()?;
    Ok(write_lark(&rules))
}

/// One element of a rule's right-hand side.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A string, as the characters it stands for.
    Literal(String),
    /// A character class: ranges of code points (a single character is a range of one).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `.`: any one character.
    Any,
    /// A special token, as written (`<[128009]>`, `<|eot_id|>`).
    Token(String),
    /// Another rule, by its GBNF name.
    Ref(String),
    Seq(Vec<Node>),
    Alt(Vec<Node>),
    Repeat {
        node: Box<Node>,
        min: u32,
        max: Option<u32>,
    },
}

struct Rule {
    name: String,
    body: Node,
}

/// Most repetitions a `{m,n}` may ask for: llama.cpp expands repetitions into copies, and a
/// huge count is a mistake that would only make the grammar engine run out of memory.
const MAX_REPEAT: u32 = 10_000;

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Parser<'a> {
        Parser { text, pos: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// An error at the current position, with its line, column and what follows.
    fn error(&self, what: impl std::fmt::Display) -> String {
        let before = &self.text[..self.pos];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let rest: String = self.text[self.pos..]
            .chars()
            .take_while(|&c| c != '\n')
            .take(20)
            .collect();
        if rest.is_empty() {
            format!("line {line}, column {column}: {what}")
        } else {
            format!("line {line}, column {column} (at {rest:?}): {what}")
        }
    }

    /// Skips blanks and comments, and line ends when `newlines` (inside parentheses, after
    /// `::=` or `|`, between rules).
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => {
                    self.bump();
                }
                '\r' | '\n' if newlines => {
                    self.bump();
                }
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n' && c != '\r') {
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    fn is_word(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '-'
    }

    fn name(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.peek().is_some_and(Self::is_word) {
            self.bump();
        }
        if self.pos == start {
            return Err(self.error("expected a rule name (letters, digits and '-')"));
        }
        Ok(self.text[start..self.pos].to_string())
    }

    fn grammar(&mut self) -> Result<Vec<Rule>, String> {
        let mut rules: Vec<Rule> = Vec::new();
        self.space(true);
        while self.peek().is_some() {
            let rule = self.rule()?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(format!("rule {:?} is defined twice", rule.name));
            }
            rules.push(rule);
            self.space(true);
        }
        if rules.is_empty() {
            return Err("the grammar has no rules; it needs at least `root ::= …`".into());
        }
        let defined: HashSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        if !defined.contains("root") {
            return Err("the grammar has no `root` rule (where the output starts)".into());
        }
        for r in &rules {
            let mut missing = None;
            visit(&r.body, &mut |n| {
                if let Node::Ref(name) = n {
                    if missing.is_none() && !defined.contains(name.as_str()) {
                        missing = Some(name.clone());
                    }
                }
            });
            if let Some(name) = missing {
                return Err(format!(
                    "rule {:?} refers to {name:?}, which is not defined",
                    r.name
                ));
            }
        }
        Ok(rules)
    }

    fn rule(&mut self) -> Result<Rule, String> {
        let name = self.name()?;
        self.space(false);
        if !self.text[self.pos..].starts_with("::=") {
            return Err(self.error(format!("expected '::=' after the rule name {name:?}")));
        }
        self.pos += 3;
        self.space(true);
        let body = self.alternatives(false)?;
        match self.peek() {
            None | Some('\n') | Some('\r') => Ok(Rule { name, body }),
            Some(_) => Err(self.error("expected the end of the line (the rule ends here)")),
        }
    }

    fn alternatives(&mut self, nested: bool) -> Result<Node, String> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.bump();
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            Node::Alt(alts)
        })
    }

    fn sequence(&mut self, nested: bool) -> Result<Node, String> {
        let mut items: Vec<Node> = Vec::new();
        loop {
            let item =
                match self.peek() {
                    Some('"') => self.literal()?,
                    Some('[') => self.class()?,
                    Some('.') => {
                        self.bump();
                        Node::Any
                    }
                    Some('(') => {
                        self.bump();
                        self.space(true);
                        let inner = self.alternatives(true)?;
                        if self.peek() != Some(')') {
                            return Err(self.error("expected ')' to close the group"));
                        }
                        self.bump();
                        inner
                    }
                    Some('<') => self.token()?,
                    Some('!') => return Err(self.error(
                        "negated tokens (!<…>) are not supported; write the allowed text instead",
                    )),
                    Some(c) if Self::is_word(c) => Node::Ref(self.name()?),
                    _ => break,
                };
            self.space(nested);
            let item = self.repetition(item, nested)?;
            items.push(item);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Node::Seq(items)
        })
    }

    fn repetition(&mut self, mut node: Node, nested: bool) -> Result<Node, String> {
        loop {
            let (min, max) = match self.peek() {
                Some('*') => (0, None),
                Some('+') => (1, None),
                Some('?') => (0, Some(1)),
                Some('{') => {
                    self.bump();
                    self.space(nested);
                    let min = self.count()?;
                    self.space(nested);
                    let max = match self.bump() {
                        Some('}') => {
                            self.pos -= 1;
                            Some(min)
                        }
                        Some(',') => {
                            self.space(nested);
                            if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                                Some(self.count()?)
                            } else {
                                None
                            }
                        }
                        _ => {
                            self.pos -= 1;
                            return Err(self.error("expected ',' or '}' in a repetition"));
                        }
                    };
                    self.space(nested);
                    if self.peek() != Some('}') {
                        return Err(self.error("expected '}' to close the repetition"));
                    }
                    if let Some(max) = max {
                        if max < min {
                            return Err(self.error(format!(
                                "the repetition's maximum {max} is below its minimum {min}"
                            )));
                        }
                    }
                    (min, max)
                }
                _ => return Ok(node),
            };
            self.bump();
            self.space(nested);
            node = Node::Repeat {
                node: Box::new(node),
                min,
                max,
            };
        }
    }

    fn count(&mut self) -> Result<u32, String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        if start == self.pos {
            return Err(self.error("expected a number in the repetition"));
        }
        match self.text[start..self.pos].parse::<u32>() {
            Ok(n) if n <= MAX_REPEAT => Ok(n),
            _ => {
                self.pos = start;
                Err(self.error(format!("repetition counts go up to {MAX_REPEAT}")))
            }
        }
    }

    /// One character of a string or class, escapes decoded.
    fn char(&mut self) -> Result<char, String> {
        let at = self.pos;
        match self.bump() {
            None => Err(self.error("unexpected end of the grammar")),
            Some('\\') => {
                let c = match self.bump() {
                    Some('n') => '\n',
                    Some('r') => '\r',
                    Some('t') => '\t',
                    Some(c @ ('"' | '\\' | '[' | ']' | '-' | '/')) => c,
                    Some('x') => self.hex(2, at)?,
                    Some('u') => self.hex(4, at)?,
                    Some('U') => self.hex(8, at)?,
                    _ => {
                        self.pos = at;
                        return Err(self.error(
                            "unknown escape; use \\n, \\r, \\t, \\\", \\\\, \\[, \\], \\xHH, \\uHHHH or \\UHHHHHHHH",
                        ));
                    }
                };
                Ok(c)
            }
            Some(c) => Ok(c),
        }
    }

    fn hex(&mut self, digits: usize, at: usize) -> Result<char, String> {
        let start = self.pos;
        for _ in 0..digits {
            if !self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                self.pos = at;
                return Err(self.error(format!("expected {digits} hexadecimal digits")));
            }
            self.bump();
        }
        u32::from_str_radix(&self.text[start..self.pos], 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| {
                self.pos = at;
                self.error("not a Unicode scalar value")
            })
    }

    fn literal(&mut self) -> Result<Node, String> {
        let start = self.pos;
        self.bump();
        let mut s = String::new();
        loop {
            match self.peek() {
                Some('"') => {
                    self.bump();
                    return Ok(Node::Literal(s));
                }
                None => {
                    self.pos = start;
                    return Err(self.error("the string that starts here is not closed with '\"'"));
                }
                Some(_) => s.push(self.char()?),
            }
        }
    }

    fn class(&mut self) -> Result<Node, String> {
        let start = self.pos;
        self.bump();
        let negated = self.peek() == Some('^');
        if negated {
            self.bump();
        }
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                Some(']') => {
                    self.bump();
                    break;
                }
                None => return Err(self.unclosed_class(start)),
                Some(_) => {
                    let lo = self.class_char(start)?;
                    let rest = &self.text[self.pos..];
                    let hi = if rest.starts_with('-') && !rest.starts_with("-]") {
                        self.bump();
                        let hi = self.class_char(start)?;
                        if hi < lo {
                            return Err(self
                                .error(format!("the range {lo:?}-{hi:?} ends before it starts")));
                        }
                        hi
                    } else {
                        lo
                    };
                    ranges.push((lo, hi));
                }
            }
        }
        if ranges.is_empty() && !negated {
            return Err(self.error("an empty character class matches nothing"));
        }
        Ok(Node::Class { negated, ranges })
    }

    /// A character of the class that starts at `start`; running out of text is the class's
    /// fault, named where it starts.
    fn class_char(&mut self, start: usize) -> Result<char, String> {
        if self.peek().is_none() {
            return Err(self.unclosed_class(start));
        }
        self.char()
    }

    fn unclosed_class(&mut self, start: usize) -> String {
        self.pos = start;
        self.error("the character class that starts here is not closed with ']'")
    }

    fn token(&mut self) -> Result<Node, String> {
        let start = self.pos;
        while let Some(c) = self.bump() {
            if c == '>' {
                let t = &self.text[start..self.pos];
                if t.len() > 2 && !t[1..t.len() - 1].contains(char::is_whitespace) {
                    return Ok(Node::Token(t.to_string()));
                }
                break;
            }
            if c.is_whitespace() {
                break;
            }
        }
        self.pos = start;
        Err(self.error("expected a special token: <[id]> or <name>"))
    }
}

/// Calls `f` on `node` and everything under it.
fn visit(node: &Node, f: &mut impl FnMut(&Node)) {
    f(node);
    match node {
        Node::Seq(items) | Node::Alt(items) => items.iter().for_each(|n| visit(n, f)),
        Node::Repeat { node, .. } => visit(node, f),
        _ => {}
    }
}

/// Writes the rules as Lark: rules that are pure text become terminals (upper-case names),
/// the rest rules (lower case), `root` becomes `start`.
fn write_lark(rules: &[Rule]) -> String {
    // A rule is text when everything in it is text and the rules it names are (found to be)
    // text; recursion never is.
    let mut terminal: HashSet<&str> = HashSet::new();
    loop {
        let before = terminal.len();
        for r in rules {
            if r.name != "root"
                && !terminal.contains(r.name.as_str())
                && is_text(&r.body, &terminal)
            {
                terminal.insert(&r.name);
            }
        }
        if terminal.len() == before {
            break;
        }
    }
    // Lark names: rules `[a-z][a-z0-9_]*`, terminals the same in upper case; GBNF names may
    // hold '-', upper case and leading digits, and two may meet after the change.
    let mut names: HashMap<&str, String> = HashMap::new();
    let mut used: HashSet<String> = HashSet::new();
    names.insert("root", "start".to_string());
    used.insert("start".to_string());
    for r in rules.iter().filter(|r| r.name != "root") {
        let mut base: String = r
            .name
            .chars()
            .map(|c| {
                if c == '-' {
                    '_'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
            base.insert_str(0, "r_");
        }
        if terminal.contains(r.name.as_str()) {
            base = base.to_ascii_uppercase();
        }
        let mut name = base.clone();
        let mut n = 2;
        while !used.insert(name.to_ascii_lowercase()) {
            name = format!("{base}_{n}");
            n += 1;
        }
        names.insert(&r.name, name);
    }
    let mut out = String::new();
    for r in rules {
        let _ = write!(out, "{}: ", names[r.name.as_str()]);
        match &r.body {
            Node::Alt(alts) => {
                for (i, a) in alts.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" | ");
                    }
                    write_node(&mut out, a, &names, Context::Alternative);
                }
            }
            body => write_node(&mut out, body, &names, Context::Alternative),
        }
        out.push('\n');
    }
    out
}

/// Whether `node` is pure text (no special token, no rule that is not text).
fn is_text(node: &Node, terminal: &HashSet<&str>) -> bool {
    match node {
        Node::Literal(_) | Node::Class { .. } | Node::Any => true,
        Node::Token(_) => false,
        Node::Ref(name) => terminal.contains(name.as_str()),
        Node::Seq(items) | Node::Alt(items) => items.iter().all(|n| is_text(n, terminal)),
        Node::Repeat { node, .. } => is_text(node, terminal),
    }
}

/// Where a node is written, for the parentheses it needs.
#[derive(Clone, Copy, PartialEq)]
enum Context {
    /// A whole alternative: sequences need none.
    Alternative,
    /// An item of a sequence: alternatives need them.
    Item,
    /// Under a repetition operator: sequences and alternatives need them.
    Repeated,
}

fn write_node(out: &mut String, node: &Node, names: &HashMap<&str, String>, cx: Context) {
    match node {
        Node::Literal(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
        // `[^]` (anything) is no regular expression; `.` with newlines is the same.
        Node::Class {
            negated: true,
            ranges,
        } if ranges.is_empty() => out.push_str("/(?s:.)/"),
        Node::Class { negated, ranges } => {
            out.push_str(if *negated { "/[^" } else { "/[" });
            for &(lo, hi) in ranges {
                regex_char(out, lo);
                if hi != lo {
                    out.push('-');
                    regex_char(out, hi);
                }
            }
            out.push_str("]/");
        }
        Node::Any => out.push_str("/(?s:.)/"),
        Node::Token(t) => out.push_str(t),
        Node::Ref(name) => out.push_str(&names[name.as_str()]),
        Node::Seq(items) if items.is_empty() => out.push_str("\"\""),
        Node::Seq(items) => {
            let wrap = cx == Context::Repeated;
            if wrap {
                out.push('(');
            }
            for (i, n) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                write_node(out, n, names, Context::Item);
            }
            if wrap {
                out.push(')');
            }
        }
        Node::Alt(alts) => {
            out.push('(');
            for (i, a) in alts.iter().enumerate() {
                if i > 0 {
                    out.push_str(" | ");
                }
                write_node(out, a, names, Context::Alternative);
            }
            out.push(')');
        }
        Node::Repeat { node, min, max } => {
            write_node(out, node, names, Context::Repeated);
            match (min, max) {
                (0, None) => out.push('*'),
                (1, None) => out.push('+'),
                (0, Some(1)) => out.push('?'),
                (m, None) => {
                    let _ = write!(out, "{{{m},}}");
                }
                (m, Some(n)) => {
                    let _ = write!(out, "{{{m},{n}}}");
                }
            }
        }
    }
}

/// A character inside a regular expression's class: letters and digits as they are, the
/// rest by code point, so nothing needs Lark's or the regex's escaping rules.
fn regex_char(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric() {
        out.push(c);
    } else {
        let _ = write!(out, "\\x{{{:X}}}", c as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::to_lark;
    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::ApproximateTokEnv;
    use llguidance::{Matcher, ParserFactory};

    /// A matcher for `gbnf` over a vocabulary of single bytes, so any text is a token
    /// sequence.
    fn matcher(gbnf: &str) -> Matcher {
        let lark = to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf:?} does not convert: {e}"));
        let env = ApproximateTokEnv::single_byte_env();
        let mut factory = ParserFactory::new_simple(&env).unwrap();
        factory.quiet();
        let parser = factory
            .create_parser(TopLevelGrammar::from_lark(lark.clone()))
            .unwrap_or_else(|e| panic!("{lark:?} does not compile: {e}"));
        Matcher::new(Ok(parser))
    }

    /// Whether the grammar's language holds exactly `text`.
    fn accepts(gbnf: &str, text: &str) -> bool {
        let mut m = matcher(gbnf);
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        if m.validate_tokens(&tokens).unwrap() != tokens.len() {
            return false;
        }
        m.consume_tokens(&tokens).unwrap();
        m.is_accepting().unwrap()
    }

    fn check(gbnf: &str, yes: &[&str], no: &[&str]) {
        for t in yes {
            assert!(accepts(gbnf, t), "{gbnf:?} should accept {t:?}");
        }
        for t in no {
            assert!(!accepts(gbnf, t), "{gbnf:?} should refuse {t:?}");
        }
    }

    #[test]
    fn rules_become_lark_rules_and_text_rules_terminals() {
        let lark = to_lark(
            "root ::= \"n=\" num-ber list\nnum-ber ::= [0-9]+\nlist ::= \"[\" list? \"]\"\n",
        )
        .unwrap();
        assert_eq!(
            lark,
            "start: \"n=\" NUM_BER list\nNUM_BER: /[0-9]/+\nlist: \"[\" list? \"]\"\n"
        );
    }

    #[test]
    fn strings_classes_and_escapes_match_what_llama_cpp_matches() {
        // A string with escapes, a class with a range and an escaped '-', a negated class
        // with a hex range, a \u escape, any character, a backslash.
        check(
            r#"root ::= "say \"hi\"\n" [a-c\-x] [^\x00-\x1F"] "\u00e9" . "\\""#,
            &[
                "say \"hi\"\nb-é\n\\",
                "say \"hi\"\nxzé☃\\",
                "say \"hi\"\n- é \\",
            ],
            &[
                "say \"hi\"\nd-é\n\\",
                "say \"hi\"\nb\"é\n\\",
                "say \"hi\"\nb\u{1}é\n\\",
                "say hi\nb-é\n\\",
            ],
        );
        check(r#"root ::= [/] "/""#, &["//"], &["/", "\\/"]);
        check("root ::= [^]", &["\n", "a"], &["", "ab"]);
    }

    #[test]
    fn repetitions_keep_their_counts() {
        let g = "root ::= \"a\"{2} \"b\"{1,} \"c\"{0,2} (\"d\" \"e\"){2,3} \"f\"* \"g\"? \"h\"+";
        check(
            g,
            &["aabdedeh", "aabbbccdededefffgh", "aabdedegh"],
            &[
                "abdedeh",
                "aadedeh",
                "aabcccdedeh",
                "aabdeh",
                "aabdededededeh",
                "aabdede",
            ],
        );
    }

    #[test]
    fn lines_groups_comments_and_recursion() {
        let g = "# balanced parentheses\nroot ::= expr\n\nexpr ::= ( \"(\" expr \")\"\n  | \"x\" ) # nested\n  \nother-rule ::= \"unused\" |\n  \"also\"\n";
        check(g, &["x", "(x)", "(((x)))"], &["", "(x", "((x)", "y"]);
    }

    #[test]
    fn names_that_meet_after_renaming_stay_apart() {
        let g = "root ::= a-b A-b 1x start\na-b ::= \"1\"\nA-b ::= \"2\"\n1x ::= \"3\"\nstart ::= \"4\"";
        check(g, &["1234"], &["1111", "4321"]);
        assert_eq!(
            to_lark(g).unwrap().lines().next(),
            Some("start: A_B A_B_2 R_1X START_2")
        );
    }

    #[test]
    fn special_tokens_pass_through() {
        assert_eq!(
            to_lark("root ::= \"call\" <[128009]> <|eot_id|>").unwrap(),
            "start: \"call\" <[128009]> <|eot_id|>\n"
        );
    }

    #[test]
    fn mistakes_are_named_with_their_place() {
        let cases = [
            ("item ::= \"x\"", "no `root` rule"),
            ("root ::= item", "refers to \"item\", which is not defined"),
            ("root ::= \"x\"\nroot ::= \"y\"", "defined twice"),
            ("root = \"x\"", "line 1, column 6"),
            ("root ::= \"x\"\nnext ::= \"open", "line 2, column 10"),
            ("root ::= [ab", "not closed with ']'"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root ::= [z-a]", "ends before it starts"),
            ("root ::= \"x\"{3,2}", "maximum 2 is below its minimum 3"),
            ("root ::= \"x\"{999999}", "repetition counts go up to 10000"),
            ("root ::= (\"x\" | \"y\"", "expected ')'"),
            ("root ::= \"x\" )", "expected the end of the line"),
            ("root ::= !<[2]>", "negated tokens"),
            ("", "no rules"),
        ];
        for (g, want) in cases {
            let e = to_lark(g).expect_err(g);
            assert!(e.contains(want), "{g:?}: {e:?} does not say {want:?}");
        }
    }

    /// Every grammar llama.cpp ships (`grammars/*.gbnf`, brought by `models/fetch-llama-cpp`)
    /// converts and compiles, and the JSON grammar holds JSON.
    #[test]
    fn llama_cpp_grammars_compile() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llama.cpp/grammars");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}; run models/fetch-llama-cpp first", dir.display()));
        let mut seen = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "gbnf") {
                let text = std::fs::read_to_string(&path).unwrap();
                matcher(&text);
                seen += 1;
            }
        }
        assert!(seen >= 8, "only {seen} grammars in {}", dir.display());
        let json = std::fs::read_to_string(dir.join("json.gbnf")).unwrap();
        check(
            &json,
            &["{\"a\": [1, 2.5e3, \"x\\n\", true, null], \"b\": {}}"],
            &["{\"a\": }", "[1, 2]", "{\"a\": 01}"],
        );
    }
}
