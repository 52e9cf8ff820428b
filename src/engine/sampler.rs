//! Choosing the next token from logits: repetition penalty, presence and frequency
//! penalties, temperature, top-k, top-p.
//!
//! Deterministic for a given seed and input: the random stream is a seeded ChaCha
//! generator owned by the sequence, and every step consumes exactly one draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings of one generation, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (None: all).
    pub top_p: Option<f32>,
    /// Divides positive logits (multiplies negative ones) of recently seen tokens; 1 = off.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Subtracted from the logit of every token the reply already holds (OpenAI's
    /// `presence_penalty`; negative values favour them).
    pub presence_penalty: f32,
    /// Subtracted once per occurrence in the reply so far (OpenAI's `frequency_penalty`).
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_k: Some(40),
            top_p: Some(0.95),
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Always the most likely token, no penalties: deterministic, for tests and benchmarks.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

/// The log-probability of `token` under `logits` (a softmax at temperature 1, after masks and
/// penalties: the distribution the token was drawn from before temperature and truncation),
/// and the `top` most likely tokens with theirs, most likely first.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| (l - max).exp())
        .sum();
    let norm = max + sum.ln();
    let lp = |l: f32| l - norm;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(idx.len());
        let by = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by);
        best = idx
            .into_iter()
            .filter(|&i| logits[i as usize].is_finite())
            .map(|i| (i, lp(logits[i as usize])))
            .collect();
    }
    (lp(logits[token as usize]), best)
}

/// The index of the largest logit: greedy decoding. Ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token has been sampled (the reply so far), for the presence and
    /// frequency penalties; kept only when one is set.
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            counts: Default::default(),
        }
    }

    /// Picks the next token (see [`Self::choose`]) and counts it for the penalties.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
            let token = self.choose(logits, recent);
            *self.counts.entry(token).or_default() += 1;
            return token;
        }
        self.choose(logits, recent)
    }

    /// Picks the next token. `recent` are the tokens generated or read so far (the last
    /// `repeat_last_n` are penalised).
    fn choose(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let start = recent.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = recent[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l >= 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, highest first, cut to top_k.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = p.top_k.unwrap_or(logits.len()).clamp(1, logits.len());
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by_logit);
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if let Some(top_p) = p.top_p {
            let mut acc = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &pr) in probs[..keep].iter().enumerate() {
            if r < pr {
                return idx[i];
            }
            r -= pr;
        }
        idx[keep - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: None,
            top_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_the_max() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_can_change_the_choice() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 8,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[1]), 2);
        // Negative logits get more negative.
        let mut l = [-1.0, -1.5];
        assert_eq!(s.sample(&mut l, &[0]), 1);
        assert_eq!(l[0], -2.0);
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let (lp, top) = logprobs(&logits, 2, 3);
        let z: f32 = [1.0f32, 3.0, 2.0].iter().map(|l| l.exp()).sum();
        assert!((lp - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        // A masked token is never among the alternatives.
        assert_eq!(logprobs(&logits, 1, 10).1.len(), 3);
        assert!(logprobs(&logits, 1, 0).1.is_empty());
    }

    #[test]
    fn presence_and_frequency_penalties_count_the_reply() {
        // Greedy: token 1 leads by 1.0 until it has been chosen enough.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.4,
            ..params(0.0)
        });
        let mut picks = Vec::new();
        for _ in 0..4 {
            picks.push(s.sample(&mut [0.0, 1.0], &[]));
        }
        // After three 1s its logit is 1.0 - 1.2 < 0.
        assert_eq!(picks, vec![1, 1, 1, 0]);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [0.0, 1.0], &[]), 1);
        let mut l = [0.0, 1.0];
        assert_eq!(s.sample(&mut l, &[]), 0);
        assert_eq!(l[1], -1.0, "once present, -2 whatever the count");
        // Negative values favour what was said.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: -2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [1.0, 0.0], &[]), 0);
        assert_eq!(s.sample(&mut [0.0, 1.5], &[]), 0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params(1.0)
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
        }
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Token 0 holds almost all the mass; with top_p 0.5 only it survives.
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.5),
            ..params(1.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0, 0.0], &[]), 0);
        }
    }
}
