//! The FFN's gated activation (SwiGLU: silu(gate) · up), between its gate/up product and its
//! down product.
//!
//! Why a kernel: it runs on one thread while the team's helpers wait for the next product, so
//! its time is the whole team's. Decoding a Llama-3.2-1B-shaped file on a 2-core Zen 4 VM,
//! the scalar loop (one `expf` call per value, 8192 per layer and token) was ~1.6% of each
//! token; in 16 lanes with `x86::attention512::exp512` (8 with AVX2 alone) it is a few
//! microseconds a layer.
//!
//! Which path runs depends only on the machine, so every row of a run takes the same
//! arithmetic.

#[cfg(target_arch = "x86_64")]
use super::x86;

/// `out[i] = silu(gate[i]) · up[i]`, silu(g) = g / (1 + e^−g).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if x86::avx512() {
        // SAFETY: AVX-512 is present (checked at run time); the lengths are equal (above).
        unsafe { x86::swiglu::swiglu_512(gate, up, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 and FMA are present (checked at run time); the lengths are equal.
        unsafe { x86::swiglu::swiglu_256(gate, up, out) };
        return;
    }
    swiglu_portable(gate, up, out);
}

/// The portable form of [`swiglu`].
fn swiglu_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector form against the portable one, on values across silu's range (deep
    /// negatives, where e^−g overflows, included), lengths with and without a tail of 16.
    #[test]
    fn swiglu_agrees_with_the_portable_loop() {
        for len in [1usize, 15, 16, 17, 100, 8192] {
            let gate: Vec<f32> = (0..len)
                .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 240.0)
                .collect();
            let up: Vec<f32> = (0..len).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
            let mut want = vec![0f32; len];
            swiglu_portable(&gate, &up, &mut want);
            for got in vector_forms(&gate, &up) {
                for i in 0..len {
                    let tol = 4.0 * f32::EPSILON * want[i].abs() + 1e-30;
                    assert!(
                        (got[i] - want[i]).abs() <= tol,
                        "len {len}, i {i}: gate {} up {}: {} vs {}",
                        gate[i],
                        up[i],
                        got[i],
                        want[i]
                    );
                }
            }
        }
        for out in vector_forms(&[f32::NAN, -1e30, 1e30], &[1.0; 3]) {
            assert!(out[0].is_nan());
            assert_eq!(out[1], 0.0); // −0 or 0
            assert_eq!(out[2], 1e30);
        }
    }

    /// What [`swiglu`] gives here, and the AVX2 form too where it is not the one taken.
    fn vector_forms(gate: &[f32], up: &[f32]) -> Vec<Vec<f32>> {
        let mut out = vec![vec![0f32; gate.len()]];
        swiglu(gate, up, &mut out[0]);
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            let mut v = vec![0f32; gate.len()];
            // SAFETY: AVX2 and FMA checked above; the lengths are equal.
            unsafe { x86::swiglu::swiglu_256(gate, up, &mut v) };
            out.push(v);
        }
        out
    }
}
