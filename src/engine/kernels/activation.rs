//! The FFN's gated activation, between its gate/up product and its down product: SwiGLU
//! (silu(gate) · up: Llama, Qwen, Mistral, Phi-3) or GeGLU (GELU-tanh(gate) · up: Gemma).
//!
//! Why a kernel: it runs on one thread while the team's helpers wait for the next product, so
//! its time is the whole team's. Decoding a Llama-3.2-1B-shaped file on a 2-core Zen 4 VM,
//! the scalar loop (one `expf` call per value, 8192 per layer and token) was ~1.6% of each
//! token; in 16 lanes with `x86::attention512::exp512` (8 with AVX2 alone) it is a few
//! microseconds a layer. Both are `gate / (1 + e^−t) · up`: t = gate for silu, and for the
//! tanh form of GELU, 0.5·x·(1 + tanh z) = x / (1 + e^−2z), t = 2z.
//!
//! Which path runs depends only on the machine, so every row of a run takes the same
//! arithmetic.

#[cfg(target_arch = "x86_64")]
use super::x86;

/// √(2/π), GELU-tanh's `z = √(2/π)·(x + 0.044715·x³)`.
pub(super) const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient of GELU-tanh.
pub(super) const GELU_CUBIC: f32 = 0.044_715;

/// `out[i] = silu(gate[i]) · up[i]`, silu(g) = g / (1 + e^−g).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    gated::<false>(gate, up, out);
}

/// `out[i] = gelu(gate[i]) · up[i]`, gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (what
/// Gemma was trained with, and llama.cpp's `ggml_gelu`).
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    gated::<true>(gate, up, out);
}

fn gated<const GELU: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if x86::avx512() {
        // SAFETY: AVX-512 is present (checked at run time); the lengths are equal (above).
        unsafe { x86::glu::gated_512::<GELU>(gate, up, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 and FMA are present (checked at run time); the lengths are equal.
        unsafe { x86::glu::gated_256::<GELU>(gate, up, out) };
        return;
    }
    portable::<GELU>(gate, up, out);
}

/// The portable form of [`swiglu`] and [`geglu`], as each is usually written.
fn portable<const GELU: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = if GELU {
            0.5 * g * (1.0 + (SQRT_2_OVER_PI * g * (1.0 + GELU_CUBIC * g * g)).tanh()) * u
        } else {
            g / (1.0 + (-g).exp()) * u
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form this CPU can run against the formulas in f64, on values across the range
    /// (deep negatives, where e^−t overflows f32, included), lengths with and without a tail of
    /// 16 and 8.
    #[test]
    fn gated_activations_agree_with_f64() {
        check::<false>();
        check::<true>();
    }

    /// GELU-tanh's 2z = 2·√(2/π)·(g + 0.044715·g³), in f64.
    fn two_z(g: f64) -> f64 {
        2.0 * (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)
    }

    fn reference(gelu: bool, g: f32, u: f32) -> f64 {
        let (g, u) = (g as f64, u as f64);
        if gelu {
            // 0.5·g·(1 + tanh z) without the cancellation of 1 + tanh z (even in f64, for
            // z below ~−10).
            g / (1.0 + (-two_z(g)).exp()) * u
        } else {
            g / (1.0 + (-g).exp()) * u
        }
    }

    /// 1 + |t| for GELU (t = 2z: its f32 rounding, a few ulp of t, becomes a relative error
    /// of e^−t), 1 for silu (t = g, exact).
    fn exponent(gelu: bool, g: f32) -> f64 {
        if gelu {
            1.0 + two_z(g as f64).abs()
        } else {
            1.0
        }
    }

    fn check<const GELU: bool>() {
        for len in [1usize, 7, 15, 16, 17, 100, 8192] {
            let gate: Vec<f32> = (0..len)
                .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 240.0)
                .chain([0.0, -0.0, 1e-20, -3.5, 2.25])
                .collect();
            let up: Vec<f32> = (0..gate.len())
                .map(|i| 1.0 + (i % 7) as f32 * 0.25)
                .collect();
            let mut portable_out = vec![0f32; gate.len()];
            portable::<GELU>(&gate, &up, &mut portable_out);
            for got in vector_forms::<GELU>(&gate, &up) {
                for i in 0..gate.len() {
                    let want = reference(GELU, gate[i], up[i]);
                    let tol =
                        8.0 * f32::EPSILON as f64 * want.abs() * exponent(GELU, gate[i]) + 1e-30;
                    assert!(
                        (got[i] as f64 - want).abs() <= tol,
                        "gelu {GELU}, len {len}, i {i}: gate {} up {}: {} vs {want}",
                        gate[i],
                        up[i],
                        got[i],
                    );
                }
            }
            for i in 0..gate.len() {
                // GELU's 1 + tanh(z) in f32 loses bits to cancellation where z < ~−1: an
                // error of the portable form, bounded by a few ulp of 0.5·g·u.
                let want = reference(GELU, gate[i], up[i]);
                let slack = if GELU {
                    (0.5 * gate[i] * up[i]).abs() as f64
                } else {
                    0.0
                };
                let tol =
                    8.0 * f32::EPSILON as f64 * (want.abs() * exponent(GELU, gate[i]) + slack)
                        + 1e-30;
                assert!(
                    (portable_out[i] as f64 - want).abs() <= tol,
                    "portable, gelu {GELU}: gate {}: {} vs {want}",
                    gate[i],
                    portable_out[i]
                );
            }
        }
        for out in vector_forms::<GELU>(&[f32::NAN, -1e30, 1e30], &[1.0; 3]) {
            assert!(out[0].is_nan());
            assert_eq!(out[1], 0.0); // −0 or 0
            assert_eq!(out[2], 1e30);
        }
    }

    /// What [`gated`] gives here, and the AVX2 form too where it is not the one taken.
    fn vector_forms<const GELU: bool>(gate: &[f32], up: &[f32]) -> Vec<Vec<f32>> {
        let mut out = vec![vec![0f32; gate.len()]];
        gated::<GELU>(gate, up, &mut out[0]);
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            let mut v = vec![0f32; gate.len()];
            // SAFETY: AVX2 and FMA checked above; the lengths are equal.
            unsafe { x86::glu::gated_256::<GELU>(gate, up, &mut v) };
            out.push(v);
        }
        out
    }
}
