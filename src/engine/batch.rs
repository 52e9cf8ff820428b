//! Continuous batching: the engine thread's loop over the sequences it is running.
//!
//! Each step is one batched forward pass ([`Model::forward_batch`]) over every running
//! sequence: one that is generating adds its last sampled token, one still reading its
//! prompt adds a chunk of it. Prompt tokens per step are bounded by `prefill_chunk` (oldest
//! prompt first), so a long prompt delays the others' next token by one chunk's time at
//! most. New requests join between steps, up to `max_batch` sequences; a finished or
//! cancelled sequence leaves at once and its place is taken at the next step.
//!
//! Why batch: generating one token reads every weight of the model for one row of
//! activations, which leaves the cores waiting on memory; eight sequences stepped together
//! read the weights once for eight rows. Everything else stays per sequence: KV cache and
//! positions, sampler (and its seed), stop strings, text decoder and event stream. A
//! sequence's tokens therefore do not depend on which others ran beside it, up to
//! floating-point rounding (one row and many rows take different matrix kernels).

use std::sync::mpsc::Receiver;
use std::time::Instant;

use super::constraint::Constraint;
use super::model::{KvCache, Segment};
use super::prefix::Entry;
use super::sampler::Sampler;
use super::stop::{StopMatcher, StopOutcome};
use super::tokenizer::DeltaDecoder;
use super::worker::{Job, LoadedEngine};
use super::{sampler, EngineError, FinishReason, GenerationEvent, GenerationSummary, TokenLogprob};

/// One request being generated.
struct Sequence {
    job: Job,
    /// When the engine took the request up.
    started: Instant,
    summary: GenerationSummary,
    /// The prompt, then each generated token; the cache holds the first `cache.len()`.
    history: Vec<u32>,
    cache: KvCache,
    /// Most tokens it may generate.
    max_new: usize,
    sampler: Sampler,
    /// The grammar the reply must match, if any: masks each step's logits.
    constraint: Option<Constraint>,
    decoder: DeltaDecoder,
    /// Special tokens whose text the reply shows (tool-call markers).
    shown: Vec<(u32, String)>,
    stops: StopMatcher,
    /// Index of the next text delta.
    deltas: usize,
    /// Log-probabilities to report: how many alternatives (`None`: none).
    logprobs: Option<usize>,
    /// Log-probabilities already sent with a delta.
    logprobs_sent: usize,
    first_token_at: Option<Instant>,
}

impl Sequence {
    /// Cancelled, or nobody listens any more.
    fn abandoned(&self) -> bool {
        self.job.cancel.is_cancelled() || self.job.events.is_closed()
    }

    /// Tokens not yet run through the model.
    fn pending(&self) -> usize {
        self.history.len() - self.cache.len()
    }

    fn generating(&self) -> bool {
        self.summary.completion_tokens > 0
    }

    fn emit(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        self.summary.text.push_str(&text);
        let logprobs = self.summary.logprobs[self.logprobs_sent..].to_vec();
        self.logprobs_sent = self.summary.logprobs.len();
        let _ = self.job.events.send(GenerationEvent::Delta {
            text,
            index: self.deltas,
            logprobs,
        });
        self.deltas += 1;
    }
}

fn new_summary() -> GenerationSummary {
    GenerationSummary {
        finish_reason: FinishReason::Stop,
        text: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        dropped_messages: 0,
        cached_tokens: 0,
        time_to_first_token: None,
        tokens_per_second: 0.0,
        error: None,
        logprobs: Vec::new(),
        stop_sequence: None,
    }
}

impl LoadedEngine {
    /// Runs requests from `jobs`, up to `max_batch` at a time, until every sender is gone
    /// and nothing is left running.
    pub(super) fn serve(&self, jobs: Receiver<Job>, max_batch: usize) {
        let max_batch = max_batch.max(1);
        let mut running: Vec<Sequence> = Vec::with_capacity(max_batch);
        loop {
            while running.len() < max_batch {
                // Idle: wait for work. Busy: take only what is already queued.
                let job = if running.is_empty() {
                    match jobs.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                };
                if job.cancel.is_cancelled() || job.events.is_closed() {
                    continue;
                }
                if let Some(seq) = self.admit(job) {
                    running.push(seq);
                }
            }
            self.step(&mut running);
        }
    }

    /// Starts a request whose prompt was built before it was queued: finds its cache; a
    /// request that cannot start ends here with its error.
    fn admit(&self, mut job: Job) -> Option<Sequence> {
        let started = Instant::now();
        let mut summary = new_summary();
        let req = &job.request.request;
        let prompt = std::mem::take(&mut job.request.prompt.tokens);
        let constraint = job.request.constraint.take();
        let shown = std::mem::take(&mut job.request.shown);
        let logprobs = req.logprobs;
        let (dropped, max_new) = (
            job.request.prompt.dropped_messages,
            job.request.prompt.max_new,
        );
        summary.prompt_tokens = prompt.len();
        summary.dropped_messages = dropped;
        let _ = job.events.send(GenerationEvent::Started {
            prompt_tokens: prompt.len(),
            dropped_messages: dropped,
        });
        let prepared = self
            .cache_for(req.cache_key, &prompt, prompt.len() + max_new)
            .map(|(cache, reused)| {
                summary.cached_tokens = reused;
                (prompt, cache, max_new)
            });
        match prepared {
            Ok((history, cache, max_new)) => Some(Sequence {
                sampler: Sampler::new(req.sampling.clone()),
                constraint,
                stops: StopMatcher::new(&req.stop),
                job,
                started,
                summary,
                history,
                cache,
                max_new,
                decoder: DeltaDecoder::default(),
                shown,
                deltas: 0,
                logprobs,
                logprobs_sent: 0,
                first_token_at: None,
            }),
            Err(e) => {
                summary.finish_reason = FinishReason::Error;
                summary.error = Some(e);
                let _ = job.events.send(GenerationEvent::Finished(summary));
                None
            }
        }
    }

    /// One forward pass for the running sequences, then one sampled token for each that
    /// has read its whole prompt. Sequences that end leave `running`.
    fn step(&self, running: &mut Vec<Sequence>) {
        let (gone, kept): (Vec<Sequence>, Vec<Sequence>) =
            running.drain(..).partition(Sequence::abandoned);
        *running = kept;
        for seq in gone {
            self.finish(seq, FinishReason::Cancelled);
        }
        if running.is_empty() {
            return;
        }
        // Generating sequences always take their step; prompts share the chunk budget,
        // oldest first.
        let mut budget = self.prefill_chunk;
        let takes: Vec<usize> = running
            .iter()
            .map(|seq| {
                let pending = seq.pending();
                if seq.generating() || pending == 1 {
                    return pending;
                }
                if budget == 0 {
                    return 0;
                }
                // A one-token segment is computed as a generated token (`cpu::product`), so
                // a prompt is never cut into a lone token: how it is cut must not change
                // its arithmetic.
                let mut take = pending.min(budget.max(2));
                if pending - take == 1 {
                    take = pending;
                }
                budget = budget.saturating_sub(take);
                take
            })
            .collect();
        #[cfg(feature = "test-hooks")]
        if let Some(pace) = self.min_token_interval {
            if running.iter().any(Sequence::generating) {
                std::thread::sleep(pace);
            }
        }
        let result = {
            let mut segs: Vec<Segment<'_>> = running
                .iter_mut()
                .zip(&takes)
                .filter(|(_, &take)| take > 0)
                .map(|(seq, &take)| {
                    let at = seq.cache.len();
                    Segment {
                        tokens: &seq.history[at..at + take],
                        cache: &mut seq.cache,
                    }
                })
                .collect();
            crate::metrics::metrics()
                .batch_size
                .observe(segs.len() as f64);
            self.model.forward_batch(&mut segs)
        };
        let mut logits = match result {
            Ok(logits) => logits.into_iter(),
            Err(e) => {
                // The pass failed for all of its sequences; the others did not run.
                let mut kept = Vec::with_capacity(running.len());
                for (seq, take) in running.drain(..).zip(takes) {
                    if take > 0 {
                        self.fail(seq, e.clone());
                    } else {
                        kept.push(seq);
                    }
                }
                *running = kept;
                return;
            }
        };
        let mut kept = Vec::with_capacity(running.len());
        for (mut seq, take) in running.drain(..).zip(takes) {
            let out = if take > 0 { logits.next() } else { None };
            // Mid-prompt (or waiting for budget): no token yet.
            let Some(out) = out.filter(|_| seq.pending() == 0) else {
                kept.push(seq);
                continue;
            };
            match self.advance(&mut seq, out) {
                Ok(None) => kept.push(seq),
                Ok(Some(reason)) => self.finish(seq, reason),
                Err(e) => self.fail(seq, e),
            }
        }
        *running = kept;
    }

    /// Samples the sequence's next token from `logits` and streams its text; says why the
    /// sequence ends, if it does.
    fn advance(
        &self,
        seq: &mut Sequence,
        mut logits: Vec<f32>,
    ) -> Result<Option<FinishReason>, EngineError> {
        if let Some(c) = &mut seq.constraint {
            c.mask(&mut logits)?;
        }
        let token = seq.sampler.sample(&mut logits, &seq.history);
        seq.summary.completion_tokens += 1;
        seq.first_token_at.get_or_insert_with(Instant::now);
        // The grammar is complete after this token: the reply ends with it.
        let complete = match &mut seq.constraint {
            Some(c) => c.commit(token)?,
            None => false,
        };
        if self.tokenizer.is_stop(token) {
            return Ok(Some(FinishReason::Stop));
        }
        if let Some(top) = seq.logprobs {
            let (logprob, best) = sampler::logprobs(&logits, token, top);
            let piece = |id: u32| {
                let text = self.tokenizer.piece(id);
                (text.clone(), text.into_bytes())
            };
            let (token_text, bytes) = piece(token);
            seq.summary.logprobs.push(TokenLogprob {
                token: token_text,
                bytes,
                logprob,
                top: best
                    .into_iter()
                    .map(|(id, lp)| {
                        let (t, b) = piece(id);
                        (t, b, lp)
                    })
                    .collect(),
            });
        }
        seq.history.push(token);
        let mut text = seq.decoder.push(&self.tokenizer, token)?;
        if let Some((_, shown)) = seq.shown.iter().find(|(id, _)| *id == token) {
            // Decoding leaves special tokens out; this one's text is part of the reply.
            text.get_or_insert_with(String::new).push_str(shown);
        }
        if let Some(text) = text {
            match seq.stops.push(&text) {
                StopOutcome::Continue(t) => seq.emit(t),
                StopOutcome::Stop(t, stop) => {
                    seq.emit(t);
                    seq.summary.stop_sequence = Some(stop);
                    return Ok(Some(FinishReason::Stop));
                }
            }
        }
        if complete {
            let rest = self.tail(seq)?;
            seq.emit(rest);
            return Ok(Some(FinishReason::Stop));
        }
        if seq.summary.completion_tokens >= seq.max_new || seq.cache.len() >= seq.cache.capacity() {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// Ends a sequence: streams what the decoder and stop matcher still hold (unless
    /// cancelled), keeps its attention state for the chat's next turn, reports.
    fn finish(&self, mut seq: Sequence, reason: FinishReason) {
        seq.summary.finish_reason = reason;
        if reason != FinishReason::Stop {
            let rest = match self.tail(&mut seq) {
                Ok(rest) => rest,
                Err(e) => return self.fail(seq, e),
            };
            if reason != FinishReason::Cancelled {
                seq.emit(rest);
            }
        }
        let Sequence {
            job,
            started,
            summary,
            mut history,
            cache,
            first_token_at,
            ..
        } = seq;
        if let Some(chat) = job.request.request.cache_key.filter(|_| cache.reusable()) {
            // Every token the cache covers went through `history` first.
            history.truncate(cache.len());
            self.prefixes.put(
                chat,
                Entry {
                    tokens: history,
                    cache,
                },
            );
        }
        report(&job, started, summary, first_token_at);
    }

    /// What the decoder and the stop matcher still hold when a sequence ends other than by a
    /// stop token or string (a held-back partial character, a possible stop string's start).
    fn tail(&self, seq: &mut Sequence) -> Result<String, EngineError> {
        let tail = seq.decoder.finish(&self.tokenizer)?.unwrap_or_default();
        Ok(match seq.stops.push(&tail) {
            StopOutcome::Continue(t) => t + &seq.stops.flush(),
            StopOutcome::Stop(t, stop) => {
                seq.summary.stop_sequence = Some(stop);
                t
            }
        })
    }

    /// Ends a sequence with an error; its attention state is not kept.
    fn fail(&self, mut seq: Sequence, e: EngineError) {
        seq.summary.finish_reason = FinishReason::Error;
        seq.summary.error = Some(e);
        report(&seq.job, seq.started, seq.summary, seq.first_token_at);
    }
}

/// Sends the sequence's summary, with its timings.
fn report(
    job: &Job,
    started: Instant,
    mut summary: GenerationSummary,
    first_token_at: Option<Instant>,
) {
    if let Some(t) = first_token_at {
        summary.time_to_first_token = Some(t - started);
        let gen_time = t.elapsed().as_secs_f64();
        if summary.completion_tokens > 1 && gen_time > 0.0 {
            summary.tokens_per_second = (summary.completion_tokens - 1) as f64 / gen_time;
        }
    }
    let _ = job.events.send(GenerationEvent::Finished(summary));
}
