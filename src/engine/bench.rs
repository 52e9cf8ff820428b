//! `confab bench`: the engine's speed in llama-bench's terms.
//!
//! - pp N: prompt processing, N random tokens in one go from an empty cache, tokens/s.
//! - tg N: generation, N tokens one at a time from an empty cache, tokens/s.
//! - tg N × B: B sequences generating N tokens each, stepped together as the server's
//!   continuous batching does (one batched forward pass per token), tokens/s of all B.
//! - tg N constrained: generation as tg, each step masked by a JSON Schema (structured
//!   output); the grammar is restarted, untimed, whenever the model completes it.
//! - time to first token: an N-token prompt processed and the first token sampled.
//! - load time and peak resident memory.
//!
//! Each figure is measured `reps` times; the report gives median and spread (min–max).

use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::constraint::{Grammar, Grammars};
use super::model::Segment;
use super::pages::{mapped_pages, MappedPages};
use super::sampler::{Sampler, SamplingParams};
use super::worker::{EngineOptions, LoadedEngine};
use super::EngineError;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub reps: usize,
    /// Batch sizes (above 1) to measure batched generation at.
    pub batches: Vec<usize>,
}

/// A measured quantity over repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    fn of(mut samples: Vec<f64>) -> Stat {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Stat {
            median,
            min: samples.first().copied().unwrap_or(0.0),
            max: samples.last().copied().unwrap_or(0.0),
            samples,
        }
    }
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub load_seconds: f64,
    /// Prompt processing, tokens/s.
    pub pp_tokens_per_second: Stat,
    /// Generation, tokens/s.
    pub tg_tokens_per_second: Stat,
    pub time_to_first_token_ms: Stat,
    /// Generation under a JSON Schema (each step masked), tokens/s.
    pub constrained_tg_tokens_per_second: Stat,
    /// Indexing the vocabulary for constrained decoding (once per model), seconds.
    pub grammar_index_seconds: f64,
    /// Batched generation: aggregate tokens/s by batch size.
    pub batched_tg: Vec<BatchedStat>,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: Option<f64>,
    /// The model file's mapped pages at the end of the run (Linux): a memory-bound decode
    /// depends on their size (two threads read a mapped file at 22–25 GB/s in 4 KiB pages,
    /// 29–36 GB/s in 2 MiB ones on a 2-core VM), so tg figures compare only beside it (see
    /// `engine::pages`).
    pub weights: Option<MappedPages>,
}

/// Aggregate generation speed of `batch` sequences stepped together.
#[derive(Debug, Clone, Serialize)]
pub struct BatchedStat {
    pub batch: usize,
    pub tokens_per_second: Stat,
}

/// `batch` sequences, `tokens` steps of one token each, all in one forward pass per step:
/// seconds taken.
fn batched_generation(
    engine: &LoadedEngine,
    batch: usize,
    tokens: usize,
    seed: u64,
) -> Result<f64, EngineError> {
    let mut caches = (0..batch)
        .map(|_| engine.model.new_cache(tokens + 1))
        .collect::<Result<Vec<_>, _>>()?;
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|_| Sampler::new(SamplingParams::greedy()))
        .collect();
    let mut next = random_tokens(engine, batch, seed);
    let t = Instant::now();
    for _ in 0..tokens {
        let mut segs: Vec<Segment<'_>> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, token)| Segment {
                tokens: std::slice::from_ref(token),
                cache,
            })
            .collect();
        let logits = engine.model.forward_batch(&mut segs)?;
        for ((mut l, s), token) in logits.into_iter().zip(&mut samplers).zip(&mut next) {
            *token = s.sample(&mut l, &[]);
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// What the constrained figure decodes to: an object of free texts and numbers, so the
/// model (greedy, from random tokens) has room to write rather than finish at once.
fn bench_schema() -> Grammar {
    Grammar::JsonSchema(serde_json::json!({
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "notes": {"type": "array", "items": {"type": "string"}},
            "score": {"type": "number"}
        },
        "required": ["title", "notes", "score"]
    }))
}

/// `tokens` generated tokens, one at a time, each step masked by [`bench_schema`]: seconds
/// spent in the steps (compiling the grammar again when the model completes it is not
/// counted).
fn constrained_generation(
    engine: &LoadedEngine,
    grammars: &Grammars,
    tokens: usize,
    seed: u64,
) -> Result<f64, EngineError> {
    let compile = || {
        grammars
            .compile(&bench_schema())
            .map_err(EngineError::InvalidGrammar)
    };
    let mut constraint = compile()?;
    let mut cache = engine.model.new_cache(tokens + 1)?;
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let mut token = random_tokens(engine, 1, seed)[0];
    let mut spent = 0.0;
    for _ in 0..tokens {
        let t = Instant::now();
        let mut logits = engine.model.forward(&[token], &mut cache)?;
        constraint.mask(&mut logits)?;
        token = sampler.sample(&mut logits, &[]);
        let complete = constraint.commit(token)?;
        spent += t.elapsed().as_secs_f64();
        if complete {
            constraint = compile()?;
        }
    }
    Ok(spent)
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Random ordinary tokens (llama-bench also uses random tokens).
fn random_tokens(engine: &LoadedEngine, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let vocab = engine.model.spec().vocab_size as u32;
    (0..n)
        .map(|_| loop {
            let t = rng.random_range(0..vocab);
            if !engine.tokenizer.is_stop(t) {
                break t;
            }
        })
        .collect()
}

pub fn run(
    model: &Path,
    opts: &EngineOptions,
    cfg: &BenchConfig,
) -> Result<BenchReport, EngineError> {
    let t0 = Instant::now();
    let engine = LoadedEngine::open(model, opts)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let greedy = SamplingParams::greedy();
    let (mut pp, mut tg, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    // One untimed warm-up of each kind.
    for rep in 0..=cfg.reps {
        let prompt = random_tokens(&engine, cfg.prompt_tokens.max(1), rep as u64);
        let mut cache = engine.model.new_cache(prompt.len() + 1)?;
        let t = Instant::now();
        let mut logits = engine.model.forward(&prompt, &mut cache)?;
        let prefill = t.elapsed().as_secs_f64();
        Sampler::new(greedy.clone()).sample(&mut logits, &prompt);
        let first = t.elapsed().as_secs_f64();

        let mut cache = engine.model.new_cache(cfg.gen_tokens.max(1) + 1)?;
        let mut sampler = Sampler::new(greedy.clone());
        let mut token = random_tokens(&engine, 1, 1000 + rep as u64)[0];
        let t = Instant::now();
        for _ in 0..cfg.gen_tokens.max(1) {
            let mut logits = engine.model.forward(&[token], &mut cache)?;
            token = sampler.sample(&mut logits, &[]);
        }
        let gen = t.elapsed().as_secs_f64();
        if rep > 0 {
            pp.push(prompt.len() as f64 / prefill);
            ttft.push(first * 1000.0);
            tg.push(cfg.gen_tokens.max(1) as f64 / gen);
        }
    }
    let t = Instant::now();
    let grammars = Grammars::new(engine.tokenizer.clone(), engine.model.spec().vocab_size)?;
    let grammar_index_seconds = t.elapsed().as_secs_f64();
    let mut constrained = Vec::new();
    for rep in 0..=cfg.reps {
        let tokens = cfg.gen_tokens.max(1);
        let secs = constrained_generation(&engine, &grammars, tokens, 1000 + rep as u64)?;
        if rep > 0 {
            constrained.push(tokens as f64 / secs);
        }
    }
    let mut batched_tg = Vec::new();
    for &batch in cfg.batches.iter().filter(|&&b| b > 1) {
        let tokens = cfg.gen_tokens.max(1);
        let mut samples = Vec::new();
        for rep in 0..=cfg.reps {
            let secs = batched_generation(&engine, batch, tokens, 2000 + rep as u64)?;
            if rep > 0 {
                samples.push((batch * tokens) as f64 / secs);
            }
        }
        batched_tg.push(BatchedStat {
            batch,
            tokens_per_second: Stat::of(samples),
        });
    }
    Ok(BenchReport {
        model: engine
            .model
            .spec()
            .name
            .clone()
            .unwrap_or_else(|| model.display().to_string()),
        device: opts.device.clone(),
        prompt_tokens: cfg.prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        load_seconds,
        pp_tokens_per_second: Stat::of(pp),
        tg_tokens_per_second: Stat::of(tg),
        time_to_first_token_ms: Stat::of(ttft),
        constrained_tg_tokens_per_second: Stat::of(constrained),
        grammar_index_seconds,
        batched_tg,
        peak_rss_mib: peak_rss_mib(),
        weights: mapped_pages(model),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stat::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(vec![1.0, 4.0]).median, 2.5);
    }
}
