//! Constrained decoding: a grammar (any JSON object, a JSON Schema, a Lark or GBNF grammar)
//! becomes, at every step of a sequence, the set of tokens that keep the output valid; the
//! others are masked out before sampling, so the output is valid by construction, whatever
//! the model.
//!
//! The grammar engine is `llguidance` (what llama.cpp and vLLM use): it compiles schemas and
//! grammars, and computes each step's mask from a trie of the vocabulary's bytes. This module
//! builds that trie from our tokenizer once per loaded model ([`Grammars`]), compiles a
//! request's grammar off the engine thread (errors name what is not supported), and gives
//! each sequence its own [`Constraint`], so sequences batched together never share state.

pub mod gbnf;

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::tokenizer::TextTokenizer;
use super::EngineError;

/// What a reply must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object` mode).
    JsonObject,
    /// A JSON value valid against this JSON Schema.
    JsonSchema(Value),
    /// A Lark grammar (llguidance's dialect; [`gbnf::to_lark`] converts llama.cpp's GBNF).
    Lark(String),
}

impl From<&crate::domain::ResponseFormat> for Grammar {
    fn from(f: &crate::domain::ResponseFormat) -> Grammar {
        match f {
            crate::domain::ResponseFormat::JsonObject => Grammar::JsonObject,
            crate::domain::ResponseFormat::JsonSchema { json_schema } => {
                Grammar::JsonSchema(json_schema.schema.clone())
            }
        }
    }
}

/// How JSON is laid out when a schema does not say (`x-guidance`): one space after `:` and
/// `,`, no other whitespace. Small models given free whitespace can emit newlines until
/// `max_tokens`; a fixed layout also makes replies stable.
fn json_layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(json!({
                "type": "object",
                "x-guidance": json_layout(),
            })),
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(o) = schema.as_object_mut() {
                    o.entry("x-guidance").or_insert_with(json_layout);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        }
    }
}

/// The vocabulary as llguidance sees it: each token's bytes (special tokens marked, so no
/// grammar text can produce them), and our tokenizer for the text it needs tokenized.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text).unwrap_or_default()
        })
    }
}

/// Compiles grammars for one loaded model; cheap to clone.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// Tokens that end a sequence (EOS, end of turn): allowed exactly when the grammar is
    /// complete.
    stops: Arc<[u32]>,
}

impl Grammars {
    /// Indexes the vocabulary of `tokenizer`, whose model scores `n_vocab` tokens (the
    /// embedding may be padded past the tokenizer's vocabulary).
    pub fn new(tokenizer: Arc<TextTokenizer>, n_vocab: usize) -> Result<Grammars, EngineError> {
        let err = |e: String| EngineError::Tokenizer(format!("constrained decoding: {e}"));
        let json: Value =
            serde_json::from_str(&tokenizer.to_json()?).map_err(|e| err(e.to_string()))?;
        let mut bytes =
            std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
                .map_err(|_| err("the vocabulary has a malformed byte token".into()))?
                .map_err(|e| err(e.to_string()))?;
        // Placeholders (special, unreachable) for ids the tokenizer has no token for.
        let n = n_vocab.max(bytes.len());
        for (id, b) in bytes.iter_mut().enumerate() {
            if b.is_empty() {
                *b = placeholder(id);
            }
        }
        while bytes.len() < n {
            bytes.push(placeholder(bytes.len()));
        }
        let stops: Vec<u32> = (0..n as u32).filter(|&t| tokenizer.is_stop(t)).collect();
        let eos = stops
            .first()
            .copied()
            .ok_or_else(|| err("the vocabulary has no end-of-sequence token".into()))?;
        let mut trie = TokTrie::from(&TokRxInfo::new(n as u32, eos), &bytes);
        if stops.len() > 1 {
            trie = trie.with_eos_tokens(&stops);
        }
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| err(e.to_string()))?;
        factory.quiet();
        Ok(Grammars {
            factory: Arc::new(factory),
            stops: stops.into(),
        })
    }

    /// Compiles `grammar` for one sequence; the error says what in it is wrong or not
    /// supported.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(grammar.top_level())
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint {
            matcher,
            stops: self.stops.clone(),
        })
    }
}

fn placeholder(id: usize) -> Vec<u8> {
    let mut b = format!(".<[{id}]>").into_bytes();
    b[0] = TokTrie::SPECIAL_TOKEN_MARKER;
    b
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
    stops: Arc<[u32]>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// Masks out (to −∞) every token that would break the grammar. When the grammar is
    /// complete only the end-of-sequence tokens remain.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| EngineError::Grammar(e.to_string()))?;
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past the sampled `token` (one the mask allowed). Returns whether the grammar
    /// is complete and allows nothing more, so the sequence ends here.
    pub fn commit(&mut self, token: u32) -> Result<bool, EngineError> {
        if self.stops.contains(&token) {
            return Ok(true);
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| EngineError::Grammar(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

/// [`Grammars`] made on first use: indexing the vocabulary takes a moment that a server
/// which never constrains a reply should not pay at start. Cheap to clone.
#[derive(Clone)]
pub struct LazyGrammars {
    tokenizer: Arc<TextTokenizer>,
    n_vocab: usize,
    made: Arc<std::sync::OnceLock<Result<Grammars, EngineError>>>,
}

impl LazyGrammars {
    pub fn new(tokenizer: Arc<TextTokenizer>, n_vocab: usize) -> LazyGrammars {
        LazyGrammars {
            tokenizer,
            n_vocab,
            made: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Compiles `grammar` for one sequence ([`EngineError::InvalidGrammar`] says what is
    /// wrong with it). Blocks while the vocabulary is indexed the first time: call it off the
    /// engine thread and off async workers.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, EngineError> {
        let grammars = self
            .made
            .get_or_init(|| Grammars::new(self.tokenizer.clone(), self.n_vocab))
            .as_ref()
            .map_err(Clone::clone)?;
        grammars
            .compile(grammar)
            .map_err(EngineError::InvalidGrammar)
    }
}
