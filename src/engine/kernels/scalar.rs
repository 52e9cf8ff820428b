//! Portable kernels: what runs where no vector kernel applies (and the reference the vector
//! kernels are tested against).

use super::formats::{BlockQ4_1, BlockQ8_0};
use super::QK;

pub fn q4_1_tile(row: &[BlockQ4_1], x: &[f32], cols: usize, t: usize, acc: &mut [f32; 4]) {
    for (bi, b) in row.iter().enumerate() {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        let mut w = [0f32; 32];
        for j in 0..16 {
            w[j] = d * (b.qs[j] & 0x0F) as f32 + m;
            w[j + 16] = d * (b.qs[j] >> 4) as f32 + m;
        }
        for (k, a) in acc[..t].iter_mut().enumerate() {
            let xs = &x[k * cols + bi * QK..k * cols + (bi + 1) * QK];
            *a += w.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
        }
    }
}

pub fn q8_0_tile(row: &[BlockQ8_0], x: &[f32], cols: usize, t: usize, acc: &mut [f32; 4]) {
    for (bi, b) in row.iter().enumerate() {
        let d = b.d.to_f32();
        for (k, a) in acc[..t].iter_mut().enumerate() {
            let xs = &x[k * cols + bi * QK..k * cols + (bi + 1) * QK];
            *a += d * b.qs.iter().zip(xs).map(|(&q, x)| q as f32 * x).sum::<f32>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::testing::matrix;
    use crate::engine::kernels::QMat;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn simd_and_scalar_agree() {
        let (m, _) = matrix(8, 64, GgmlDType::Q4_1);
        let x: Vec<f32> = (0..4 * 64).map(|i| (i as f32).sin()).collect();
        if let QMat::Q4_1 { blocks, .. } = &m {
            let mut a = [0f32; 4];
            q4_1_tile(&blocks[0..2], &x, 64, 4, &mut a);
            let mut b = [0f32; 4];
            b.copy_from_slice(&[0.0; 4]);
            m.dot_tile(0, &x, 4, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4, "{p} vs {q}");
            }
        }
    }
}
