//! Plain text completion: a text run as is (no chat template, BOS as the vocabulary says),
//! then tokens until an end token or the limit. What `confab run --raw` prints, and what
//! compares a model file with `llama-simple` / `llama-cli --no-conversation` token for token.

use super::sampler::{Sampler, SamplingParams};
use super::tokenizer::DeltaDecoder;
use super::worker::LoadedEngine;
use super::EngineError;

/// Runs `text` and generates up to `max_tokens` tokens, handing each new piece of text to
/// `emit` as soon as it is whole characters. Returns how many tokens were generated.
pub fn complete(
    engine: &LoadedEngine,
    text: &str,
    sampling: SamplingParams,
    max_tokens: usize,
    mut emit: impl FnMut(&str),
) -> Result<usize, EngineError> {
    let tok = &engine.tokenizer;
    let prompt = tok.tokenize(text, tok.add_bos)?;
    if prompt.is_empty() {
        return Err(EngineError::Tokenizer(
            "the prompt is empty and the vocabulary adds no BOS: nothing to continue".into(),
        ));
    }
    if prompt.len() >= engine.context_length {
        return Err(EngineError::PromptTooLong {
            tokens: prompt.len(),
            context: engine.context_length,
        });
    }
    let max_tokens = max_tokens.min(engine.context_length - prompt.len());
    let mut cache = engine.model.new_cache(prompt.len() + max_tokens)?;
    let mut logits = Vec::new();
    for chunk in prompt.chunks(engine.prefill_chunk) {
        logits = engine.model.forward(chunk, &mut cache)?;
    }
    let mut sampler = Sampler::new(sampling);
    let mut recent = prompt;
    let mut decoder = DeltaDecoder::default();
    let mut generated = 0;
    while generated < max_tokens {
        let token = sampler.sample(&mut logits, &recent);
        if tok.is_stop(token) {
            break;
        }
        generated += 1;
        if let Some(piece) = decoder.push(tok, token)? {
            emit(&piece);
        }
        recent.push(token);
        if generated < max_tokens {
            logits = engine.model.forward(&[token], &mut cache)?;
        }
    }
    if let Some(piece) = decoder.finish(tok)? {
        emit(&piece);
    }
    Ok(generated)
}
