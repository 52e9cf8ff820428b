//! [`super::super::activation::swiglu`] in 16 lanes.

use std::arch::x86_64::*;

use super::attention512::exp512;

/// `out[i] = gate[i] / (1 + e^−gate[i]) · up[i]`, sixteen at a time (the tail masked).
///
/// # Safety
/// AVX-512 (F) must be present; the three slices have the same length.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn swiglu_512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let len = out.len();
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let one = _mm512_set1_ps(1.0);
    // Below this e^−g overflows f32 (the portable loop's g / ∞ = −0) and `exp512` clamps.
    let low = _mm512_set1_ps(-88.0);
    let one_of = |g: __m512, u: __m512| {
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let v = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
        // Not less than: NaN stays NaN.
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(g, low), v)
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
