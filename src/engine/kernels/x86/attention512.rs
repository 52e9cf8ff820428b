//! The AVX-512 attention kernel for 64-wide heads, and its vector `exp` (which the gated
//! activations of [`super::glu`] use too, and whose constants their AVX2 `exp` shares).

use std::arch::x86_64::*;

use super::hsum512;

/// `sc[i] = exp(sc[i] - max(sc))`, sixteen at a time; returns their sum. (The scalar
/// `exp` per score was a quarter of the attention time.)
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn softmax_weights_512(sc: &mut [f32]) -> f32 {
    let (p, len) = (sc.as_mut_ptr(), sc.len());
    let tail = (len % 16) as u32;
    let tail_mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
    let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 16 <= len {
        maxv = _mm512_max_ps(maxv, _mm512_loadu_ps(p.add(i)));
        i += 16;
    }
    if tail > 0 {
        maxv = _mm512_mask_max_ps(
            maxv,
            tail_mask,
            maxv,
            _mm512_maskz_loadu_ps(tail_mask, p.add(i)),
        );
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
    let mut sum = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= len {
        let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
        i += 16;
    }
    if tail > 0 {
        let x = _mm512_maskz_loadu_ps(tail_mask, p.add(i));
        let e = _mm512_maskz_mov_ps(tail_mask, exp512(_mm512_sub_ps(x, max)));
        _mm512_mask_storeu_ps(p.add(i), tail_mask, e);
        sum = _mm512_add_ps(sum, e);
    }
    _mm512_reduce_add_ps(sum)
}

/// ln 2 in two parts, so that `x − n·ln2` is exact for the n of `exp`'s range.
pub(super) const LN2_PARTS: [f32; 2] = [0.693_359_4, -2.121_944_4e-4];
/// Cephes' single-precision polynomial for e^r − 1 − r over r², |r| ≤ ln2 / 2, from the
/// highest power down.
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `exp(x)` for 16 lanes (Cephes' single-precision polynomial, within 2 ulp; results
/// below `f32`'s range flush towards 0).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn exp512(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-103.0)),
        _mm512_set1_ps(88.7),
    );
    // x = n ln2 + r, |r| <= ln2 / 2.
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_PARTS[0]), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_PARTS[1]), r);
    let mut y = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
    }
    y = _mm512_fmadd_ps(
        y,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(y, n)
}

/// The 64 values at `p` as four vectors (one head's query, key or value row).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn load64(p: *const f32) -> [__m512; 4] {
    [
        _mm512_loadu_ps(p),
        _mm512_loadu_ps(p.add(16)),
        _mm512_loadu_ps(p.add(32)),
        _mm512_loadu_ps(p.add(48)),
    ]
}

/// Lane-wise products of two 64-value rows summed into one vector (its 16 lanes add up
/// to the dot product): the one score arithmetic for whole blocks and the tail alike.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dot64(q: &[__m512; 4], k: &[__m512; 4]) -> __m512 {
    let mut acc = _mm512_mul_ps(q[0], k[0]);
    acc = _mm512_fmadd_ps(q[1], k[1], acc);
    acc = _mm512_fmadd_ps(q[2], k[2], acc);
    _mm512_fmadd_ps(q[3], k[3], acc)
}

/// Lane j of the result = the sum of the 16 lanes of `v[j]`: a transpose-and-add tree
/// (15 shuffles and adds per level pair) instead of 16 horizontal sums.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn sum16(v: &[__m512; 16]) -> __m512 {
    // Level 1, pairs (a, b): each 128-bit lane holds [a0+a2, b0+b2, a1+a3, b1+b3].
    let mut l1 = [_mm512_setzero_ps(); 8];
    for (i, o) in l1.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *o = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Level 2, four vectors (a, b, c, d): each 128-bit lane holds that lane's sums
    // [a, b, c, d].
    let mut l2 = [_mm512_setzero_ps(); 4];
    for (i, o) in l2.iter_mut().enumerate() {
        let (x, y) = (_mm512_castps_pd(l1[2 * i]), _mm512_castps_pd(l1[2 * i + 1]));
        *o = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
        );
    }
    // Level 3: lanes (0+1) and (2+3) of two groups of four, side by side.
    let mut l3 = [_mm512_setzero_ps(); 2];
    for (i, o) in l3.iter_mut().enumerate() {
        let (u, w) = (l2[2 * i], l2[2 * i + 1]);
        *o = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(u, w),
            _mm512_shuffle_f32x4::<0xDD>(u, w),
        );
    }
    // Level 4: whole sums, group g (vectors 4g..4g+4) in 128-bit lane g.
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(l3[0], l3[1]),
        _mm512_shuffle_f32x4::<0xDD>(l3[0], l3[1]),
    )
}

/// Attention of `G` query heads (`q`: G × 64) that share one KV head, over `len`
/// cached positions (`keys`, `values`: len × 64 each, contiguous), into `out` (G × 64):
/// scores, softmax, weighted sum of the values. Each query head's 64 values sit in four
/// registers for the whole pass, and so do its 64 outputs: every key and value row is
/// loaded once for the G heads and nothing else goes through memory.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn attend_64<const G: usize>(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    debug_assert!(q.len() == G * 64 && out.len() == G * 64);
    debug_assert!(keys.len() >= len * 64 && values.len() >= len * 64);
    let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
    let mut qv = [[_mm512_setzero_ps(); 4]; G];
    for (g, qg) in qv.iter_mut().enumerate() {
        *qg = load64(qp.add(g * 64));
    }
    scores.clear();
    scores.resize(G * len, 0.0);
    let scale_v = _mm512_set1_ps(scale);
    // Sixteen positions at a time: their sixteen dot-product vectors are summed
    // together ([`sum16`]) instead of one horizontal sum each.
    let full = len - len % 16;
    for p in (0..full).step_by(16) {
        for (g, qg) in qv.iter().enumerate() {
            let mut accs = [_mm512_setzero_ps(); 16];
            for (j, acc) in accs.iter_mut().enumerate() {
                *acc = dot64(qg, &load64(kp.add((p + j) * 64)));
            }
            let s = _mm512_mul_ps(sum16(&accs), scale_v);
            _mm512_storeu_ps(scores.as_mut_ptr().add(g * len + p), s);
        }
    }
    for p in full..len {
        let k = load64(kp.add(p * 64));
        for (g, qg) in qv.iter().enumerate() {
            *scores.get_unchecked_mut(g * len + p) = hsum512(dot64(qg, &k)) * scale;
        }
    }
    let mut sums = [0f32; G];
    for (sc, sum) in scores.chunks_exact_mut(len).zip(sums.iter_mut()) {
        *sum = softmax_weights_512(sc);
    }
    let mut ov = [[_mm512_setzero_ps(); 4]; G];
    for p in 0..len {
        let v = load64(vp.add(p * 64));
        for (g, og) in ov.iter_mut().enumerate() {
            let w = _mm512_set1_ps(*scores.get_unchecked(g * len + p) / sums[g]);
            for (o, vj) in og.iter_mut().zip(&v) {
                *o = _mm512_fmadd_ps(w, *vj, *o);
            }
        }
    }
    let op = out.as_mut_ptr();
    for (g, og) in ov.iter().enumerate() {
        for (j, v) in og.iter().enumerate() {
            _mm512_storeu_ps(op.add(g * 64 + j * 16), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector `exp` of the attention kernel against `f32::exp`.
    #[test]
    fn vector_exp_matches_std() {
        if !crate::engine::kernels::x86::avx512() {
            return;
        }
        let xs: Vec<f32> = (0..4000).map(|i| -100.0 + i as f32 * 0.0471).collect();
        for chunk in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 checked above; 16 values in, 16 out.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp512(_mm512_loadu_ps(chunk.as_ptr()))) };
            for (x, g) in chunk.iter().zip(got) {
                let want = x.exp();
                assert!(
                    (g - want).abs() <= want * 3e-7 + 1e-37,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        // Softmax weights: lengths around the vector width, a tail included.
        for len in [1, 15, 16, 17, 40] {
            let mut sc: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want: Vec<f32> = sc.iter().map(|v| (v - max).exp()).collect();
            // SAFETY: AVX-512 checked above.
            let sum = unsafe { softmax_weights_512(&mut sc) };
            for (g, w) in sc.iter().zip(&want) {
                assert!((g - w).abs() <= w * 1e-6, "len {len}: {g} vs {w}");
            }
            assert!((sum - want.iter().sum::<f32>()).abs() < 1e-4 * len as f32);
        }
    }
}
