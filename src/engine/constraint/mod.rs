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

    /// Tokens that spell exactly `s` (llguidance forces them when the grammar allows only
    /// this text). Our tokenizer's split, when it spells `s`; else the trie's greedy one:
    /// a vocabulary may add what the text does not hold (a BOS token, SentencePiece's
    /// leading space), and a forced BOS would start every Llama 2 or Mistral JSON reply.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let ids = self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.tokenize(text, false).unwrap_or_default()
        });
        if self.trie.decode_raw(&ids) == s {
            ids
        } else {
            self.trie.greedy_tokenize(s)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A schema whose every valid value is short, so a random walk through it ends.
    fn schema() -> Value {
        json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 6},
                "n": {"type": "integer", "minimum": 0, "maximum": 99},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "ok": {"type": "boolean"}},
            "required": ["name", "n", "tags", "ok"], "additionalProperties": false})
    }

    /// On the vocabulary of the GGUF file at `path`: from each seed, a walk that picks a
    /// random allowed token at every step until only end tokens remain. At each step the
    /// mask agrees with llguidance's own token-by-token check (every allowed token, and a
    /// sample of the refused ones; where the grammar forces text, only its one spelling is
    /// allowed), and the walk's text, decoded by our tokenizer, is JSON valid against the
    /// schema.
    fn walks(path: &str, seeds: std::ops::Range<u64>) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let tok =
            Arc::new(TextTokenizer::from_file(&path).unwrap_or_else(|e| {
                panic!("{e}: run models/fetch and models/fetch-llama-cpp first")
            }));
        let n = tok.vocab_size();
        let grammars = Grammars::new(tok.clone(), n).unwrap();
        let grammar = Grammar::JsonSchema(schema());
        for seed in seeds {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut ours = grammars.compile(&grammar).unwrap();
            let mut reference = Matcher::new(Ok(grammars
                .factory
                .create_parser(grammar.top_level())
                .unwrap()));
            let mut ids = Vec::new();
            loop {
                assert!(ids.len() < 300, "seed {seed}: the walk does not end");
                let mut logits = vec![0.0f32; n];
                ours.mask(&mut logits).unwrap();
                let allowed: Vec<u32> = (0..n as u32)
                    .filter(|&t| logits[t as usize].is_finite())
                    .collect();
                assert!(!allowed.is_empty(), "seed {seed}: nothing allowed");
                let sample = (0..200).map(|_| rng.random_range(0..n as u32));
                for t in allowed.iter().copied().chain(sample) {
                    if grammars.stops.contains(&t) {
                        continue;
                    }
                    let library = reference.validate_tokens(&[t]).unwrap() == 1;
                    let mask = logits[t as usize].is_finite();
                    // Where the grammar forces its next bytes the mask holds only the token
                    // that spells them; other spellings the library would take are left out.
                    let forced = allowed.len() == 1;
                    assert!(
                        mask == library || (forced && !mask),
                        "seed {seed}, token {t} ({}) after {ids:?}: mask {mask}, llguidance {library}",
                        grammars.factory.tok_env().tok_trie().token_dbg(t)
                    );
                }
                let t = allowed[rng.random_range(0..allowed.len())];
                if grammars.stops.contains(&t) {
                    break;
                }
                ids.push(t);
                reference.consume_tokens(&[t]).unwrap();
                if ours.commit(t).unwrap() {
                    break;
                }
            }
            let text = tok.decode(&ids).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
            let o = v.as_object().unwrap_or_else(|| panic!("{text}"));
            assert_eq!(o.len(), 4, "{text}");
            assert!(
                o["name"].as_str().is_some_and(|s| s.chars().count() <= 6),
                "{text}"
            );
            assert!(o["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
            let tags = o["tags"].as_array().unwrap();
            assert!(
                tags.len() <= 2 && tags.iter().all(|t| t == "a" || t == "b"),
                "{text}"
            );
            assert!(o["ok"].is_boolean(), "{text}");
        }
    }

    #[test]
    fn masks_agree_with_the_library_on_smollm2s_vocabulary() {
        walks("models/SmolLM2-135M-Instruct.Q4_1.gguf", 0..4);
    }

    /// SentencePiece with byte fallback (Llama 2, Mistral), and GPT-2-style byte-level BPE.
    #[test]
    fn masks_agree_with_the_library_on_other_vocabularies() {
        walks("models/llama.cpp/models/ggml-vocab-llama-spm.gguf", 0..2);
        walks("models/llama.cpp/models/ggml-vocab-llama-bpe.gguf", 0..2);
    }
}
