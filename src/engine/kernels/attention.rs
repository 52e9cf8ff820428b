//! Attention of one KV head's query group over a sequence's cache: the AVX-512 kernel for
//! 64-wide heads where the CPU has it, else a portable loop.
//!
//! Which path runs depends only on the model and the machine (never on the row or the
//! batch), so every row of a run takes the same arithmetic.

use super::scalar::{axpy, dot};
#[cfg(target_arch = "x86_64")]
use super::x86;

/// One query group's attention: the `group` query heads `q` (group × `head_dim`) that share
/// one KV head, over `len` positions of `keys` and `values` (len × `head_dim`, contiguous),
/// into `out` (group × `head_dim`): scaled dot-product scores, softmax, weighted sum of the
/// values. `softcap`: scores become `cap·tanh(score/cap)` before the softmax (Gemma 2).
/// `scores` is scratch space, reused between calls.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    group: usize,
    head_dim: usize,
    keys: &[f32],
    values: &[f32],
    len: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    debug_assert_eq!(q.len(), group * head_dim);
    debug_assert_eq!(out.len(), group * head_dim);
    debug_assert!(keys.len() >= len * head_dim && values.len() >= len * head_dim);
    if softcap.is_none() && attend_64(q, group, head_dim, keys, values, len, scale, scores, out) {
        return;
    }
    portable(
        q, group, head_dim, keys, values, len, scale, softcap, scores, out,
    );
}

/// The AVX-512 kernel, when it applies: AVX-512 present, heads 64 wide, at most four query
/// heads per KV head. False otherwise.
#[allow(clippy::too_many_arguments)]
fn attend_64(
    q: &[f32],
    group: usize,
    head_dim: usize,
    keys: &[f32],
    values: &[f32],
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if x86::avx512() && head_dim == 64 && (1..=4).contains(&group) {
        let (keys, values) = (&keys[..len * 64], &values[..len * 64]);
        // SAFETY: AVX-512 is present (checked at run time); `q` and `out` hold group × 64
        // values and `keys`/`values` len × 64 (sliced above).
        unsafe {
            match group {
                1 => x86::attention512::attend_64::<1>(q, keys, values, len, scale, scores, out),
                2 => x86::attention512::attend_64::<2>(q, keys, values, len, scale, scores, out),
                3 => x86::attention512::attend_64::<3>(q, keys, values, len, scale, scores, out),
                _ => x86::attention512::attend_64::<4>(q, keys, values, len, scale, scores, out),
            }
        }
        return true;
    }
    let _ = (q, group, head_dim, keys, values, len, scale, scores, out);
    false
}

/// The portable loop: every score, then a softmax per head, then the weighted values.
#[allow(clippy::too_many_arguments)]
fn portable(
    q: &[f32],
    group: usize,
    head_dim: usize,
    keys: &[f32],
    values: &[f32],
    len: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = head_dim;
    // The group's scores, then its softmax sums.
    scores.clear();
    scores.resize(group * len + group, 0.0);
    let (scores, sums) = scores.split_at_mut(group * len);
    for p in 0..len {
        let key = &keys[p * hd..(p + 1) * hd];
        for (g, qh) in q.chunks_exact(hd).enumerate() {
            scores[g * len + p] = dot(qh, key) * scale;
        }
    }
    if let Some(cap) = softcap {
        scores.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
    }
    for (sc, sum) in scores.chunks_exact_mut(len).zip(sums.iter_mut()) {
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in sc.iter_mut() {
            *v = (*v - max).exp();
            *sum += *v;
        }
    }
    out.fill(0.0);
    for p in 0..len {
        let value = &values[p * hd..(p + 1) * hd];
        for (g, og) in out.chunks_exact_mut(hd).enumerate() {
            axpy(og, scores[g * len + p] / sums[g], value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention, written out as the definition reads.
    fn reference(
        q: &[f32],
        hd: usize,
        keys: &[f32],
        values: &[f32],
        len: usize,
        cap: Option<f32>,
    ) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = Vec::new();
        for qh in q.chunks_exact(hd) {
            let sc: Vec<f32> = (0..len)
                .map(|p| {
                    let k = &keys[p * hd..(p + 1) * hd];
                    let s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    cap.map_or(s, |c| c * (s / c).tanh())
                })
                .collect();
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = sc.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            for j in 0..hd {
                out.push((0..len).map(|p| e[p] / sum * values[p * hd + j]).sum());
            }
        }
        out
    }

    /// Both paths (the AVX-512 kernel where the machine has it, and the portable loop)
    /// against the definition: whole blocks of 16 positions, a partial one, fewer than 16;
    /// head sizes the kernel takes and others.
    #[test]
    fn attention_matches_the_definition() {
        for hd in [64, 128, 80] {
            for len in [37, 1, 15, 16, 64] {
                let keys: Vec<f32> = (0..len * hd).map(|i| (i as f32 * 0.011).sin()).collect();
                let values: Vec<f32> = (0..len * hd).map(|i| (i as f32 * 0.007).cos()).collect();
                for group in 1..=5 {
                    let q: Vec<f32> = (0..group * hd)
                        .map(|i| (i as f32 * 0.03).sin() * 2.0)
                        .collect();
                    let want = reference(&q, hd, &keys, &values, len, None);
                    let scale = 1.0 / (hd as f32).sqrt();
                    let mut fast = vec![0f32; group * hd];
                    attend(
                        &q,
                        group,
                        hd,
                        &keys,
                        &values,
                        len,
                        scale,
                        None,
                        &mut Vec::new(),
                        &mut fast,
                    );
                    let mut slow = vec![0f32; group * hd];
                    portable(
                        &q,
                        group,
                        hd,
                        &keys,
                        &values,
                        len,
                        scale,
                        None,
                        &mut Vec::new(),
                        &mut slow,
                    );
                    for ((f, s), w) in fast.iter().zip(&slow).zip(&want) {
                        assert!(
                            (f - w).abs() < 1e-4,
                            "hd {hd} len {len} group {group}: {f} vs {w}"
                        );
                        assert!(
                            (s - w).abs() < 1e-4,
                            "portable, hd {hd} len {len}: {s} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Soft-capped scores (Gemma 2) bend large scores towards the cap before the softmax.
    #[test]
    fn soft_capping_matches_the_definition() {
        let (hd, len, group) = (64, 20, 2);
        let keys: Vec<f32> = (0..len * hd)
            .map(|i| (i as f32 * 0.013).sin() * 3.0)
            .collect();
        let values: Vec<f32> = (0..len * hd).map(|i| (i as f32 * 0.005).cos()).collect();
        let q: Vec<f32> = (0..group * hd)
            .map(|i| (i as f32 * 0.02).cos() * 3.0)
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let cap = 1.5;
        let want = reference(&q, hd, &keys, &values, len, Some(cap));
        let plain = reference(&q, hd, &keys, &values, len, None);
        let mut got = vec![0f32; group * hd];
        attend(
            &q,
            group,
            hd,
            &keys,
            &values,
            len,
            scale,
            Some(cap),
            &mut Vec::new(),
            &mut got,
        );
        let mut moved = 0f32;
        for ((g, w), p) in got.iter().zip(&want).zip(&plain) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            moved = moved.max((w - p).abs());
        }
        assert!(moved > 1e-2, "the cap changed nothing: not a test");
    }
}
