//! The gated activations of [`crate::engine::kernels::activation`] in 16 lanes (AVX-512) or
//! 8 (AVX2): `gate / (1 + e^−t) · up`, t = gate (SwiGLU) or 2·√(2/π)·(gate + 0.044715·gate³)
//! (GeGLU, GELU's tanh form).

use std::arch::x86_64::*;

use super::attention512::{exp512, EXP_POLY, LN2_PARTS};
use crate::engine::kernels::activation::{GELU_CUBIC, SQRT_2_OVER_PI};

/// `out[i] = gate[i] / (1 + e^−t) · up[i]` (see the module doc), sixteen at a time (the tail
/// masked).
///
/// # Safety
/// AVX-512 (F) must be present; the three slices have the same length.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn gated_512<const GELU: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let len = out.len();
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let one = _mm512_set1_ps(1.0);
    // Below this e^−t overflows f32 (the portable loop's g / ∞ = −0) and `exp512` clamps.
    let low = _mm512_set1_ps(-88.0);
    let (c2, cubic) = (
        _mm512_set1_ps(2.0 * SQRT_2_OVER_PI),
        _mm512_set1_ps(GELU_CUBIC),
    );
    let one_of = |g: __m512, u: __m512| {
        let t = if GELU {
            // 2z = 2·√(2/π)·g·(1 + 0.044715·g²)
            let g2 = _mm512_mul_ps(g, g);
            _mm512_mul_ps(_mm512_mul_ps(c2, g), _mm512_fmadd_ps(cubic, g2, one))
        } else {
            g
        };
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), t));
        let v = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
        // Not less than: NaN stays NaN.
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(t, low), v)
    };
    let mut i = 0;
    while i + 16 <= len {
        let v = one_of(_mm512_loadu_ps(g.add(i)), _mm512_loadu_ps(u.add(i)));
        _mm512_storeu_ps(o.add(i), v);
        i += 16;
    }
    if i < len {
        let m: __mmask16 = ((1u32 << (len - i)) - 1) as __mmask16;
        let v = one_of(
            _mm512_maskz_loadu_ps(m, g.add(i)),
            _mm512_maskz_loadu_ps(m, u.add(i)),
        );
        _mm512_mask_storeu_ps(o.add(i), m, v);
    }
}

/// [`gated_512`] in 8 lanes, for CPUs without AVX-512 (most desktops and laptops).
///
/// # Safety
/// AVX2 and FMA must be present; the three slices have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gated_256<const GELU: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let len = out.len();
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let one = _mm256_set1_ps(1.0);
    let low = _mm256_set1_ps(-88.0);
    let (c2, cubic) = (
        _mm256_set1_ps(2.0 * SQRT_2_OVER_PI),
        _mm256_set1_ps(GELU_CUBIC),
    );
    let one_of = |g: __m256, u: __m256| {
        let t = if GELU {
            let g2 = _mm256_mul_ps(g, g);
            _mm256_mul_ps(_mm256_mul_ps(c2, g), _mm256_fmadd_ps(cubic, g2, one))
        } else {
            g
        };
        let e = exp_256(_mm256_sub_ps(_mm256_setzero_ps(), t));
        let v = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
        // Below −88 e^−t overflows f32 (the portable loop's g / ∞ = −0); not less than:
        // NaN stays NaN.
        _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_NLT_UQ>(t, low))
    };
    let mut i = 0;
    while i + 8 <= len {
        let v = one_of(_mm256_loadu_ps(g.add(i)), _mm256_loadu_ps(u.add(i)));
        _mm256_storeu_ps(o.add(i), v);
        i += 8;
    }
    // The tail, through buffers padded with zeros (their lanes past the tail not stored).
    if i < len {
        let (mut gt, mut ut) = ([0f32; 8], [0f32; 8]);
        gt[..len - i].copy_from_slice(&gate[i..]);
        ut[..len - i].copy_from_slice(&up[i..]);
        let mut ot = [0f32; 8];
        _mm256_storeu_ps(
            ot.as_mut_ptr(),
            one_of(_mm256_loadu_ps(gt.as_ptr()), _mm256_loadu_ps(ut.as_ptr())),
        );
        out[i..].copy_from_slice(&ot[..len - i]);
    }
}

/// `exp(x)` for 8 lanes, by the polynomial of [`super::attention512::exp512`], for x in
/// −87..88 (clamped to it: 2^n is built in the exponent field, which holds normal numbers
/// only; below, e^x < 2⁻¹²⁵ is lost beside the 1 it is added to in [`gated_256`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    // x = n ln2 + r, |r| <= ln2 / 2.
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_PARTS[0]), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_PARTS[1]), r);
    let mut y = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
    }
    y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2^n: n + 127 in the exponent field (n in −126..=127 after the clamp).
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}
