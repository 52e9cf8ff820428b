//! The GGML block formats the kernels read, as stored in GGUF files.

use half::f16;

use super::QK;

/// GGML Q4_1 block: `x = d * q + m`, q in 0..16; `qs[j]` holds element j in its low
/// nibble and element j + 16 in its high nibble.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// GGML Q8_0 block: `x = d * q`, q in -127..=127.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// Decodes a tensor's bytes block by block (`N` bytes each).
pub(super) fn read_blocks<T: Copy, const N: usize>(
    bytes: &[u8],
    decode: impl Fn(&[u8; N]) -> T,
) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| decode(c.try_into().expect("exact chunk")))
        .collect()
}

/// Quantizes f32 rows to Q8_0 (for weights stored in formats without a kernel here).
pub(super) fn quantize_q8_0(data: &[f32]) -> Vec<BlockQ8_0> {
    data.chunks_exact(QK)
        .map(|c| {
            let amax = c.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            for (q, &v) in qs.iter_mut().zip(c) {
                *q = (v * id).round() as i8;
            }
            BlockQ8_0 {
                d: f16::from_f32(d),
                qs,
            }
        })
        .collect()
}
