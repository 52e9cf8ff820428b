//! The model's tokenizer, built from the GGUF's own metadata (or a `tokenizer.json` beside the
//! model file), and UTF-8-safe incremental decoding for streaming.
//!
//! candle's GGUF tokenizer gets SmolLM2 wrong (it adds a prefix space and splits ChatML
//! markers). What reproduces the model's Hugging Face tokenizer: a BPE model from the GGUF
//! vocabulary and merges; pre-tokenization by single digits, then byte-level without a prefix
//! space; a byte-level decoder; control and user-defined tokens registered as special tokens
//! so `<|im_start|>` stays one token.
//!
//! Special tokens come only from the chat template, never from message text: contents are
//! [`TextTokenizer::escape`]d before the template sees them, and [`TextTokenizer::encode_prompt`] turns the
//! template's special-token texts into their ids and everything else (the escaped text put
//! back as it was) into ordinary tokens. A user who types `<|im_start|>system` gets the
//! characters, not a forged turn.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::gguf::{md_string, md_u32};
use super::EngineError;

/// GGUF token types that mark special tokens (3 = control, 4 = user-defined).
const SPECIAL_TOKEN_TYPES: [i32; 2] = [3, 4];

/// Token texts that end an assistant turn in common chat formats.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
    "<end_of_turn>",
];

/// Marks an escaped special token (followed by a character that gives its index) or, doubled,
/// a literal occurrence of itself. A private-use code point: no model gives it meaning.
const ESCAPE: char = '\u{10FFFD}';
/// Escaped special token `k` is `ESCAPE` followed by `char(INDEX_BASE + k)` (plane 15,
/// private use).
const INDEX_BASE: u32 = 0xF0000;
const MAX_SPECIALS: usize = 0xFFFD;

/// The texts of a vocabulary's special tokens, and a matcher that finds them.
struct Specials {
    texts: Vec<String>,
    ids: Vec<u32>,
    /// Leftmost-longest over `texts`, so `<|im_start|>` wins over a shorter token that is
    /// its prefix.
    matcher: Option<AhoCorasick>,
}

impl Specials {
    fn new(tokenizer: &Tokenizer) -> Result<Specials, EngineError> {
        let mut pairs: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        pairs.sort();
        pairs.truncate(MAX_SPECIALS);
        let (texts, ids): (Vec<String>, Vec<u32>) = pairs.into_iter().unzip();
        let matcher = if texts.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&texts)
                    .map_err(err)?,
            )
        };
        Ok(Specials {
            texts,
            ids,
            matcher,
        })
    }
}

/// A tokenizer plus the special tokens generation needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer with special-token splitting off: text in, ordinary tokens out.
    plain: Tokenizer,
    specials: Specials,
    /// Most bytes one ordinary token stands for: a text of `n` bytes takes at least
    /// `n / max_token_bytes` tokens, which refuses a prompt that cannot fit before it is
    /// tokenized.
    pub max_token_bytes: usize,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    /// Whether prompts should start with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Tokens after which generation stops: EOS and end-of-turn markers.
    stop_ids: Vec<u32>,
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Uses `tokenizer.json` next to the model when present, else the GGUF metadata.
    pub fn load(
        model_path: &Path,
        md: &HashMap<String, Value>,
    ) -> Result<TextTokenizer, EngineError> {
        let json = model_path.with_file_name("tokenizer.json");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| err(format!("{}: {e}", json.display())))?
        } else {
            from_gguf(md)?
        };
        Self::with_specials(inner, md)
    }

    /// The tokenizer of a GGUF file (or of the `tokenizer.json` beside it), reading only the
    /// header: vocab-only files work, whatever their architecture.
    pub fn from_file(path: &Path) -> Result<TextTokenizer, EngineError> {
        let mut file = std::fs::File::open(path).map_err(|e| {
            EngineError::Model(format!("cannot open model file {}: {e}", path.display()))
        })?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
            EngineError::Model(format!(
                "{} is not a readable GGUF file: {e}",
                path.display()
            ))
        })?;
        Self::load(path, &content.metadata)
    }

    fn with_specials(
        inner: Tokenizer,
        md: &HashMap<String, Value>,
    ) -> Result<TextTokenizer, EngineError> {
        let named = |key: &str| {
            md_u32(md, key).and_then(|id| {
                inner
                    .id_to_token(id)
                    .map(|t| (id, decode_piece(&inner, id, &t)))
            })
        };
        let bos = named("tokenizer.ggml.bos_token_id");
        let eos = named("tokenizer.ggml.eos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or_else(|| default_add_bos(md));
        let mut stop_ids: Vec<u32> = END_OF_TURN
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        if let Some((id, _)) = &eos {
            stop_ids.push(*id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        if stop_ids.is_empty() {
            return Err(err("the model defines no end-of-sequence token"));
        }
        let specials = Specials::new(&inner)?;
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let max_token_bytes = max_token_bytes(&inner, &specials);
        Ok(TextTokenizer {
            plain,
            specials,
            max_token_bytes,
            inner,
            bos,
            eos,
            add_bos,
            stop_ids,
        })
    }

    /// Token ids of `text`; special-token markup in it (e.g. `<|im_start|>`) becomes the
    /// special tokens, as chat templates expect.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self.inner.encode_fast(text, false).map_err(err)?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some((bos, _)) = &self.bos {
                if ids.first() != Some(bos) {
                    ids.insert(0, *bos);
                }
            }
        }
        Ok(ids)
    }

    /// Token ids of `text`, BOS first when `bos` (whatever the vocabulary's
    /// `add_bos_token` says); special-token text becomes the special token.
    pub fn tokenize(&self, text: &str, bos: bool) -> Result<Vec<u32>, EngineError> {
        let mut ids = Vec::new();
        if bos {
            let (id, _) = self
                .bos
                .as_ref()
                .ok_or_else(|| err("the vocabulary has no BOS token"))?;
            ids.push(*id);
        }
        ids.extend_from_slice(self.inner.encode_fast(text, false).map_err(err)?.get_ids());
        Ok(ids)
    }

    /// The text of one token as the model's vocabulary decodes it (special tokens included;
    /// a byte that is not a whole character shows as U+FFFD).
    pub fn piece(&self, id: u32) -> String {
        let text = self.inner.decode(&[id], false).unwrap_or_default();
        // SentencePiece decoding drops the space a text's first `▁` stands for; a piece
        // shown alone keeps it, as llama.cpp shows it.
        match self.inner.id_to_token(id) {
            Some(raw) if raw.starts_with('\u{2581}') && !text.starts_with(' ') => {
                format!(" {text}")
            }
            _ => text,
        }
    }

    /// Token ids of a prompt rendered by the chat template from [`Self::escape`]d contents: the
    /// special-token texts in it (all the template's own) become their ids, the rest is
    /// tokenized as text with escapes undone. Without escapes this gives the same ids as
    /// [`Self::encode`]; with them, a content's special-token text stays characters.
    pub fn encode_prompt(&self, rendered: &str) -> Result<Vec<u32>, EngineError> {
        let mut ids = Vec::with_capacity(rendered.len() / 3 + 2);
        if self.add_bos {
            if let Some((bos, _)) = &self.bos {
                ids.push(*bos);
            }
        }
        let text = |piece: &str, ids: &mut Vec<u32>| -> Result<(), EngineError> {
            if piece.is_empty() {
                return Ok(());
            }
            let piece = self.unescape(piece);
            let enc = self.plain.encode_fast(piece.as_ref(), false).map_err(err)?;
            ids.extend_from_slice(enc.get_ids());
            Ok(())
        };
        let mut at = 0;
        if let Some(m) = &self.specials.matcher {
            for found in m.find_iter(rendered) {
                text(&rendered[at..found.start()], &mut ids)?;
                let id = self.specials.ids[found.pattern().as_usize()];
                // The template's own BOS where `add_bos` already put one.
                if !(ids.len() == 1 && found.start() == 0 && self.add_bos && ids[0] == id) {
                    ids.push(id);
                }
                at = found.end();
            }
        }
        text(&rendered[at..], &mut ids)?;
        Ok(ids)
    }

    /// `content` with every special-token text (and the escape character itself) replaced by
    /// an escape the template passes through untouched and [`Self::encode_prompt`] undoes.
    pub fn escape<'a>(&self, content: &'a str) -> Cow<'a, str> {
        let Some(m) = &self.specials.matcher else {
            return escape_marker(content);
        };
        if !content.contains(ESCAPE) && m.find(content).is_none() {
            return Cow::Borrowed(content);
        }
        let mut out = String::with_capacity(content.len() + 8);
        let mut at = 0;
        for found in m.find_iter(content) {
            out.push_str(&escape_marker(&content[at..found.start()]));
            out.push(ESCAPE);
            out.push(index_char(found.pattern().as_usize()));
            at = found.end();
        }
        out.push_str(&escape_marker(&content[at..]));
        Cow::Owned(out)
    }

    fn unescape<'a>(&self, piece: &'a str) -> Cow<'a, str> {
        if !piece.contains(ESCAPE) {
            return Cow::Borrowed(piece);
        }
        let mut out = String::with_capacity(piece.len());
        let mut chars = piece.chars();
        while let Some(c) = chars.next() {
            if c != ESCAPE {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some(ESCAPE) => out.push(ESCAPE),
                Some(i) => match (i as u32)
                    .checked_sub(INDEX_BASE)
                    .and_then(|k| self.specials.texts.get(k as usize))
                {
                    Some(t) => out.push_str(t),
                    None => {
                        out.push(c);
                        out.push(i);
                    }
                },
                None => out.push(c),
            }
        }
        Cow::Owned(out)
    }

    /// The vocabulary's special tokens (id, text): the ones only a template may produce.
    pub fn special_tokens(&self) -> impl Iterator<Item = (u32, &str)> {
        self.specials
            .ids
            .iter()
            .copied()
            .zip(self.specials.texts.iter().map(String::as_str))
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner.decode(ids, true).map_err(err)
    }

    /// True when generation should end after this token.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as a `tokenizer.json` document (constrained decoding reads each token's
    /// bytes from it).
    pub fn to_json(&self) -> Result<String, EngineError> {
        self.inner.to_string(false).map_err(err)
    }
}

fn escape_marker(s: &str) -> Cow<'_, str> {
    if s.contains(ESCAPE) {
        let mut doubled = String::with_capacity(2);
        doubled.push(ESCAPE);
        doubled.push(ESCAPE);
        Cow::Owned(s.replace(ESCAPE, &doubled))
    } else {
        Cow::Borrowed(s)
    }
}

fn index_char(k: usize) -> char {
    // `k < MAX_SPECIALS`, so this stays inside plane 15.
    char::from_u32(INDEX_BASE + k as u32).unwrap_or(ESCAPE)
}

/// The longest decoded text of any ordinary token, in bytes (a byte that is not a whole
/// character decodes to U+FFFD, 3 bytes: an overestimate keeps the bound safe).
fn max_token_bytes(t: &Tokenizer, specials: &Specials) -> usize {
    let mut max = 1;
    for id in 0..t.get_vocab_size(true) as u32 {
        if specials.ids.contains(&id) {
            continue;
        }
        if let Ok(s) = t.decode(&[id], false) {
            max = max.max(s.len());
        }
    }
    max
}

/// The text a single token stands for (special tokens included), for template variables
/// such as `bos_token`.
fn decode_piece(t: &Tokenizer, id: u32, raw: &str) -> String {
    t.decode(&[id], false).unwrap_or_else(|_| raw.to_string())
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, EngineError> {
    let v = md
        .get(key)
        .ok_or_else(|| err(format!("GGUF metadata has no `{key}`")))?;
    v.to_vec()
        .map_err(err)?
        .iter()
        .map(|x| x.to_string().cloned().map_err(err))
        .collect()
}

/// Pre-token patterns of Hugging Face's tokenizers for the `tokenizer.ggml.pre` types that
/// llama.cpp's converter writes, as their `tokenizer.json` files have them.
mod patterns {
    /// Llama 3 (`llama-bpe`): up to three digits a piece.
    pub const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    /// Qwen2 / Qwen2.5 / Qwen3: one digit a piece.
    pub const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    /// Qwen3.5: letters keep their combining marks.
    pub const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    /// The CJK ranges both DeepSeek tokenizers keep together.
    pub const DEEPSEEK_CJK: &str = "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+";
    /// DeepSeek LLM's letters: Latin, Greek, Cyrillic, … listed by range.
    pub const DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+";
    pub const DEEPSEEK_LLM_PUNCT: &str =
        "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+";
    /// Falcon: punctuation and ASCII symbols first, then GPT-2's split, then runs of three
    /// digits.
    pub const FALCON_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|`]+";
    /// llama.cpp's `default` (a GGUF without a pre-tokenizer type).
    pub const DEFAULT_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|]+";
}

/// The pre-tokenizer types this module reproduces; any other is refused by name.
pub const SUPPORTED_PRE_TYPES: &[&str] = &[
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "deepseek-r1-qwen",
    "qwen35",
    "smollm",
    "gpt-2",
    "phi-2",
    "mpt",
    "gpt-neox",
    "olmo",
    "deepseek-llm",
    "deepseek-coder",
    "starcoder",
    "refact",
    "command-r",
    "falcon",
    "default",
];

/// Whether prompts start with BOS when the file does not say (`add_bos_token`), as
/// llama.cpp decides (`llama_vocab::impl::load`): SentencePiece vocabularies and the Llama 3
/// family of BPE ones do, other BPE vocabularies do not.
fn default_add_bos(md: &HashMap<String, Value>) -> bool {
    match md_string(md, "tokenizer.ggml.model").unwrap_or("gpt2") {
        "llama" => true,
        "gpt2" => matches!(
            md_string(md, "tokenizer.ggml.pre"),
            Some("llama-bpe" | "llama3" | "llama-v3")
        ),
        _ => false,
    }
}

/// The pre-tokenizer of a `tokenizer.ggml.pre` type, and whether its BPE ignores merges for
/// whole words in the vocabulary. Each is the sequence Hugging Face's `tokenizer.json` of
/// that family has (checked token for token against llama.cpp's vocab test files).
fn pre_tokenizer(pre: Option<&str>) -> Result<(PreTokenizerWrapper, bool), EngineError> {
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::SplitDelimiterBehavior::Isolated;
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, EngineError> {
        Ok(
            Split::new(SplitPattern::Regex(pattern.into()), Isolated, false)
                .map_err(err)?
                .into(),
        )
    };
    // Byte-level mapping only (the splitting is done by the patterns before it), or with
    // GPT-2's own pattern.
    let bytes = || -> PreTokenizerWrapper { ByteLevel::new(false, true, false).into() };
    let gpt2 = || -> PreTokenizerWrapper { ByteLevel::new(false, true, true).into() };
    let seq =
        |parts: Vec<PreTokenizerWrapper>| -> PreTokenizerWrapper { Sequence::new(parts).into() };
    use patterns as p;
    Ok(match pre {
        Some("llama-bpe" | "llama3" | "llama-v3") => (seq(vec![split(p::LLAMA3)?, bytes()]), true),
        Some("qwen2" | "deepseek-r1-qwen") => (seq(vec![split(p::QWEN2)?, bytes()]), false),
        Some("qwen35") => (seq(vec![split(p::QWEN35)?, bytes()]), false),
        Some("gpt-2" | "phi-2" | "mpt" | "gpt-neox" | "olmo") => (gpt2(), false),
        // Digits one by one, then GPT-2's split.
        Some("smollm" | "starcoder" | "refact" | "command-r") => {
            (seq(vec![Digits::new(true).into(), gpt2()]), false)
        }
        Some("deepseek-llm") => (
            seq(vec![
                split("[\r\n]")?,
                split(p::DEEPSEEK_LLM_LETTERS)?,
                split(p::DEEPSEEK_LLM_PUNCT)?,
                split("\\s+$")?,
                split(p::DEEPSEEK_CJK)?,
                Digits::new(false).into(),
                bytes(),
            ]),
            false,
        ),
        Some("deepseek-coder") => (
            seq(vec![
                split("[\r\n]")?,
                split(r"\s?\p{L}+")?,
                split(r"\s?\p{P}+")?,
                split(p::DEEPSEEK_CJK)?,
                Digits::new(true).into(),
                bytes(),
            ]),
            false,
        ),
        Some("falcon") => (
            seq(vec![
                split(p::FALCON_PUNCT)?,
                gpt2(),
                split("[0-9][0-9][0-9]")?,
            ]),
            false,
        ),
        None | Some("default") => {
            tracing::warn!(
                "the model file names no pre-tokenizer type (tokenizer.ggml.pre): using llama.cpp's \
                 default split, which may not be the one the model was trained with"
            );
            (
                seq(vec![
                    split(p::DEFAULT_PUNCT)?,
                    gpt2(),
                    split(r"\p{N}+")?,
                    split("[0-9][0-9][0-9]")?,
                ]),
                false,
            )
        }
        Some(other) => {
            return Err(err(format!(
                "pre-tokenizer type {other:?} (tokenizer.ggml.pre) is not supported; supported: {}",
                SUPPORTED_PRE_TYPES.join(", ")
            )))
        }
    })
}

/// Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer, EngineError> {
    let model = md_string(md, "tokenizer.ggml.model").unwrap_or("gpt2");
    match model {
        "gpt2" => {}
        "llama" => return sentencepiece_from_gguf(md),
        _ => {
            return Err(err(format!(
                "tokenizer type {model:?} (tokenizer.ggml.model) is not supported from GGUF \
                 metadata (supported: gpt2, llama); put the model's tokenizer.json next to the \
                 .gguf file"
            )))
        }
    }
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(err(format!("malformed merge {m:?}"))),
        })
        .collect::<Result<_, _>>()?;
    let types = token_types(md, tokens.len());
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(unk) =
        md_u32(md, "tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize))
    {
        builder = builder.unk_token(unk.clone());
    }
    let pre = md_string(md, "tokenizer.ggml.pre");
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre)?;
    // Llama 3's tokenizer takes a pre-token that is itself in the vocabulary as one token,
    // whatever the merges would make of it (Hugging Face's `ignore_merges`).
    let bpe = builder.ignore_merges(ignore_merges).build().map_err(err)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens(&special_tokens(&tokens, &types));
    Ok(tok)
}

/// A SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral,
/// Phi-3, Gemma) as Hugging Face builds it from the `.model` file: BPE whose merges are every
/// split of a piece into two pieces, ranked by the merged piece's score (the order
/// SentencePiece merges in), byte fallback (`<0xNN>`) for what the vocabulary lacks, spaces
/// as `▁` with one prepended (unless `tokenizer.ggml.add_space_prefix` is false).
fn sentencepiece_from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer, EngineError> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
    use tokenizers::DecoderWrapper;

    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = md
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| err("GGUF metadata has no `tokenizer.ggml.scores`"))?
        .iter()
        .map(|x| x.to_f32().unwrap_or(0.0))
        .collect();
    if scores.len() != tokens.len() {
        return Err(err(format!(
            "{} token scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let types = token_types(md, tokens.len());
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    // Every way to split a piece into two pieces, ranked by the piece's score (highest
    // first; a stable sort keeps ties in id order, and a piece's splits by their parts' ids,
    // as Hugging Face's `SentencePieceExtractor` does).
    let mut ranked: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Control, unknown and byte tokens are never the product of a merge.
        if !matches!(types[id], 1 | 4) {
            continue;
        }
        let mut local: Vec<(u32, u32, &str, &str)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(l, r, _, _)| (l, r));
        ranked.extend(
            local
                .into_iter()
                .map(|(l, r, a, b)| (scores[id], l, r, a, b)),
        );
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) =
        md_u32(md, "tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize))
    {
        builder = builder.unk_token(unk.clone());
    }
    let mut tok = Tokenizer::new(builder.build().map_err(err)?);
    let add_space_prefix = md
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let replace = Replace::new(" ", "\u{2581}").map_err(err)?;
    let normalizer: NormalizerSequence = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("\u{2581}".into()).into(), replace.into()])
    } else {
        NormalizerSequence::new(vec![replace.into()])
    };
    tok.with_normalizer(Some(normalizer));
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ").map_err(err)?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    tok.add_special_tokens(&special_tokens(&tokens, &types));
    Ok(tok)
}

/// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), all
/// normal when absent.
fn token_types(md: &HashMap<String, Value>, n: usize) -> Vec<i32> {
    let mut types: Vec<i32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    types.resize(n, 1);
    types
}

/// Control and user-defined tokens, as special tokens: matched whole in template text.
fn special_tokens(tokens: &[String], types: &[i32]) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter(|(_, ty)| SPECIAL_TOKEN_TYPES.contains(ty))
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect()
}

/// Turns a growing list of token ids into text deltas that never split a UTF-8 character
/// and never lose the space a byte-level token carries.
///
/// Decoding token by token loses information (a token can hold half of a character, and
/// some decoders strip a leading space), so each step decodes a short window: the tokens
/// since the last emitted boundary, and emits the part of the text that is new.
#[derive(Default)]
pub struct DeltaDecoder {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_start: usize,
    /// End of the text already emitted, as a token index.
    emitted_upto: usize,
}

impl DeltaDecoder {
    /// Adds a token and returns the text it completes, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>, EngineError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_start..self.emitted_upto])?;
        let full = tok.decode(&self.ids[self.prefix_start..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = without_nul(&full[prefix.len()..]);
            self.prefix_start = self.emitted_upto;
            self.emitted_upto = self.ids.len();
            Ok(Some(delta).filter(|d| !d.is_empty()))
        } else {
            Ok(None)
        }
    }

    /// Text held back at the end (an incomplete character), decoded as is.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<Option<String>, EngineError> {
        if self.emitted_upto == self.ids.len() {
            return Ok(None);
        }
        let prefix = tok.decode(&self.ids[self.prefix_start..self.emitted_upto])?;
        let full = tok.decode(&self.ids[self.prefix_start..])?;
        self.emitted_upto = self.ids.len();
        Ok(full
            .get(prefix.len()..)
            .map(without_nul)
            .filter(|s| !s.is_empty()))
    }
}

/// Generated text never holds U+0000 (a byte token a model may sample): no client expects
/// it, and PostgreSQL cannot store it.
fn without_nul(s: &str) -> String {
    s.replace('\0', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;

    /// llama.cpp's vocab-only GGUFs (`models/fetch-llama-cpp`), with the texts and token ids
    /// Hugging Face's tokenizers give for them.
    fn vocab_dir() -> std::path::PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llama.cpp/models");
        assert!(
            dir.is_dir(),
            "{} is missing: run models/fetch-llama-cpp (the README's test command does)",
            dir.display()
        );
        dir
    }

    fn metadata(path: &Path) -> HashMap<String, Value> {
        let mut f = std::fs::File::open(path).unwrap();
        Content::read(&mut f).unwrap().metadata
    }

    /// Every vocabulary of the list (SentencePiece-style and BPE), every test text, token
    /// for token.
    #[test]
    fn vocabularies_match_hugging_face() {
        let dir = vocab_dir();
        let mut failures = Vec::new();
        for name in [
            "llama-spm",
            "phi-3",
            "llama-bpe",
            "qwen2",
            "qwen35",
            "gpt-2",
            "mpt",
            "starcoder",
            "refact",
            "command-r",
            "falcon",
            "deepseek-llm",
            "deepseek-coder",
        ] {
            let file = dir.join(format!("ggml-vocab-{name}.gguf"));
            let tok = from_gguf(&metadata(&file)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let inp = std::fs::read_to_string(file.with_extension("gguf.inp")).unwrap();
            let out = std::fs::read_to_string(file.with_extension("gguf.out")).unwrap();
            const SEP: &str = "\n__ggml_vocab_test__\n";
            let texts: Vec<&str> = inp.strip_suffix(SEP).unwrap_or(&inp).split(SEP).collect();
            let want: Vec<&str> = out.lines().collect();
            assert_eq!(texts.len(), want.len(), "{name}: .inp and .out disagree");
            let mut bad = 0;
            for (text, want) in texts.iter().zip(&want) {
                let got: Vec<String> = tok
                    .encode_fast(*text, false)
                    .unwrap()
                    .get_ids()
                    .iter()
                    .map(u32::to_string)
                    .collect();
                let want: Vec<&str> = want.split_whitespace().collect();
                let ids: Vec<u32> = want.iter().map(|i| i.parse().unwrap()).collect();
                let back = tok.decode(&ids, false).unwrap();
                if back != *text {
                    failures.push(format!("{name}: {text:?} decodes back as {back:?}"));
                }
                if got != want {
                    bad += 1;
                    if bad <= 2 {
                        failures.push(format!("{name}: {text:?}\n  got  {got:?}\n  want {want:?}"));
                    }
                }
            }
            if bad > 0 {
                failures.push(format!("{name}: {bad} of {} texts differ", texts.len()));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused_by_name() {
        let Err(e) = pre_tokenizer(Some("klingon-bpe")) else {
            panic!("accepted an unknown pre-tokenizer type");
        };
        let msg = e.to_string();
        assert!(
            msg.contains("klingon-bpe") && msg.contains("llama-bpe"),
            "{msg}"
        );
    }
}
