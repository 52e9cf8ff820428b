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
            .unwrap_or(false);
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

/// Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer, EngineError> {
    let model = md_string(md, "tokenizer.ggml.model").unwrap_or("gpt2");
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer type {model:?} is not supported from GGUF metadata; put the model's tokenizer.json next to the .gguf file"
        )));
    }
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(err(format!("malformed merge {m:?}"))),
        })
        .collect::<Result<_, _>>()?;
    let types: Vec<i32> = match md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
    {
        Some(v) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
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
    let bpe = builder.build().map_err(err)?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre: PreTokenizerWrapper = match md_string(md, "tokenizer.ggml.pre") {
        // SmolLM splits digits one by one before the byte-level split.
        Some("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        _ => byte_level.into(),
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .filter(|(_, ty)| SPECIAL_TOKEN_TYPES.contains(ty))
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
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
