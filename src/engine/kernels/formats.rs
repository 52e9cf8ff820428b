//! The GGML weight formats the kernels read, as stored in GGUF files, and their scalar
//! dequantization: the definition every vector kernel is tested against.
//!
//! The arithmetic follows ggml's `dequantize_row_*` (and gguf-py's numpy copies of it)
//! operation for operation, so a dequantized value is the same f32 bit for bit: products
//! such as `d * sc` are rounded to f32 before they scale `q`, and nothing is fused.

use bytemuck::{Pod, Zeroable};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// Values per block of the 32-wide formats (Q4_0, Q4_1, Q8_0).
pub const QK: usize = 32;
/// Values per super-block of the K-quants.
pub const QK_K: usize = 256;

/// A storage format of weight matrices; every one is read in place, none converted at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Every format, in the order the README lists them.
#[cfg(test)]
pub const FORMATS: [Format; 11] = [
    Format::Q4K,
    Format::Q5K,
    Format::Q6K,
    Format::Q8_0,
    Format::Q4_0,
    Format::Q4_1,
    Format::Q5_0,
    Format::Q5_1,
    Format::F16,
    Format::BF16,
    Format::F32,
];

impl Format {
    /// The format of a GGUF tensor type, if the kernels read it.
    pub fn from_ggml(t: GgmlDType) -> Option<Format> {
        Some(match t {
            GgmlDType::F32 => Format::F32,
            GgmlDType::F16 => Format::F16,
            GgmlDType::BF16 => Format::BF16,
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q5_1 => Format::Q5_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q5K => Format::Q5K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// The name ggml and llama.cpp use.
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "F32",
            Format::F16 => "F16",
            Format::BF16 => "BF16",
            Format::Q4_0 => "Q4_0",
            Format::Q4_1 => "Q4_1",
            Format::Q5_0 => "Q5_0",
            Format::Q5_1 => "Q5_1",
            Format::Q8_0 => "Q8_0",
            Format::Q4K => "Q4_K",
            Format::Q5K => "Q5_K",
            Format::Q6K => "Q6_K",
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::BF16 => 1,
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => QK,
            Format::Q4K | Format::Q5K | Format::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::BF16 => 2,
            Format::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
            Format::Q4_1 => std::mem::size_of::<BlockQ4_1>(),
            Format::Q5_0 => std::mem::size_of::<BlockQ5_0>(),
            Format::Q5_1 => std::mem::size_of::<BlockQ5_1>(),
            Format::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            Format::Q4K => std::mem::size_of::<BlockQ4K>(),
            Format::Q5K => std::mem::size_of::<BlockQ5K>(),
            Format::Q6K => std::mem::size_of::<BlockQ6K>(),
        }
    }

    /// Alignment its blocks need in memory (that of their widest field).
    pub fn align(self) -> usize {
        match self {
            Format::F32 => 4,
            _ => 2,
        }
    }

    /// Bytes of one row of `cols` values; None when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_values())
            .then(|| cols / self.block_values() * self.block_bytes())
    }

    /// Dequantizes whole blocks: `bytes` holds `out.len() / block_values()` blocks.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(
            bytes.len() / self.block_bytes(),
            out.len() / self.block_values()
        );
        match self {
            Format::F32 => out.copy_from_slice(cast(bytes)),
            Format::F16 => {
                for (o, h) in out.iter_mut().zip(cast::<f16>(bytes)) {
                    *o = h.to_f32();
                }
            }
            Format::BF16 => {
                for (o, h) in out.iter_mut().zip(cast::<bf16>(bytes)) {
                    *o = h.to_f32();
                }
            }
            Format::Q4_0 => blocks_into::<BlockQ4_0>(bytes, out, BlockQ4_0::dequantize),
            Format::Q4_1 => blocks_into::<BlockQ4_1>(bytes, out, BlockQ4_1::dequantize),
            Format::Q5_0 => blocks_into::<BlockQ5_0>(bytes, out, BlockQ5_0::dequantize),
            Format::Q5_1 => blocks_into::<BlockQ5_1>(bytes, out, BlockQ5_1::dequantize),
            Format::Q8_0 => blocks_into::<BlockQ8_0>(bytes, out, BlockQ8_0::dequantize),
            Format::Q4K => blocks_into::<BlockQ4K>(bytes, out, BlockQ4K::dequantize),
            Format::Q5K => blocks_into::<BlockQ5K>(bytes, out, BlockQ5K::dequantize),
            Format::Q6K => blocks_into::<BlockQ6K>(bytes, out, BlockQ6K::dequantize),
        }
    }
}

/// The blocks (or values) of a format in `bytes`, read in place. Panics when `bytes` is
/// misaligned or not whole blocks: weights are only ever laid out by [`super::QMat`], which
/// checks both.
pub fn cast<T: Pod>(bytes: &[u8]) -> &[T] {
    bytemuck::cast_slice(bytes)
}

fn blocks_into<B: Pod>(bytes: &[u8], out: &mut [f32], f: impl Fn(&B, &mut [f32])) {
    let blocks = cast::<B>(bytes);
    let per = out.len() / blocks.len().max(1);
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(per)) {
        f(b, o);
    }
}

/// Q4_0: `x = d * (q - 8)`, q in 0..16; `qs[j]` holds element j in its low nibble and
/// element j + 16 in its high nibble.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

impl BlockQ4_0 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for j in 0..16 {
            out[j] = ((self.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            out[j + 16] = ((self.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: `x = d * q + m`, q in 0..16, nibbles as Q4_0.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

impl BlockQ4_1 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for j in 0..16 {
            out[j] = d * (self.qs[j] & 0x0F) as f32 + m;
            out[j + 16] = d * (self.qs[j] >> 4) as f32 + m;
        }
    }
}

/// What the vector kernels read of Q4_0 and Q4_1 blocks: 32 nibbles (low nibbles the first
/// 16 values, high nibbles the last 16) whose values are `d q + m`. Q4_0 stores no `m`: its
/// `d (q - 8)` is `d q + m` with `m = -8 d`, exactly (`8 d` is `d` times a power of two, and a
/// fused multiply-add rounds `d q - 8 d` once, as the scalar code rounds `d (q - 8)`), so one
/// kernel serves both.
pub trait Nibbles32: Pod {
    fn d(&self) -> f16;
    /// Q4_1's stored minimum; `None` for Q4_0 (`m = -8 d`).
    fn m(&self) -> Option<f16>;
    fn qs(&self) -> &[u8; 16];
}

impl Nibbles32 for BlockQ4_0 {
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> Option<f16> {
        None
    }
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
}

impl Nibbles32 for BlockQ4_1 {
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> Option<f16> {
        Some(self.m)
    }
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
}

/// Q5_0: `x = d * (q - 16)`, q in 0..32: low nibbles as Q4_0, bit j of `qh` (little-endian)
/// the fifth bit of element j.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

impl BlockQ5_0 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) as u8 & 0x10;
            let h1 = (qh >> (j + 12)) as u8 & 0x10;
            out[j] = (((self.qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
            out[j + 16] = (((self.qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1: `x = d * q + m`, q in 0..32, bits as Q5_0.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

impl BlockQ5_1 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) as u8 & 0x10;
            let h1 = (qh >> (j + 12)) as u8 & 0x10;
            out[j] = ((self.qs[j] & 0x0F) | h0) as f32 * d + m;
            out[j + 16] = ((self.qs[j] >> 4) | h1) as f32 * d + m;
        }
    }
}

/// Q8_0: `x = d * q`, q in -128..=127.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

impl BlockQ8_0 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

/// Q4_K: 256 values in 8 sub-blocks of 32, `x = d·sc_j · q − dmin·m_j`, q in 0..16, with 6-bit
/// sub-block scales and mins packed in `scales`. The 32-byte group g of `qs` holds sub-block
/// 2g in its low nibbles and 2g + 1 in its high nibbles.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K / Q5_K block
/// (ggml's `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl BlockQ4K {
    /// The eight sub-blocks' `d·sc` and `dmin·m`, rounded to f32 as ggml rounds them.
    #[inline]
    pub fn scales(&self) -> ([f32; 8], [f32; 8]) {
        sub_scales(self.d, self.dmin, &self.scales)
    }

    pub fn dequantize(&self, out: &mut [f32]) {
        let (ds, ms) = self.scales();
        for g in 0..4 {
            let q = &self.qs[g * 32..(g + 1) * 32];
            let (lo, hi) = out[g * 64..(g + 1) * 64].split_at_mut(32);
            for l in 0..32 {
                lo[l] = ds[2 * g] * (q[l] & 0xF) as f32 - ms[2 * g];
                hi[l] = ds[2 * g + 1] * (q[l] >> 4) as f32 - ms[2 * g + 1];
            }
        }
    }
}

#[inline]
fn sub_scales(d: f16, dmin: f16, packed: &[u8; 12]) -> ([f32; 8], [f32; 8]) {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let mut ds = [0f32; 8];
    let mut ms = [0f32; 8];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, packed);
        ds[j] = d * sc as f32;
        ms[j] = dmin * m as f32;
    }
    (ds, ms)
}

/// What the vector kernels read of Q4_K and Q5_K blocks, which share their scales and
/// nibbles (Q5_K adds a fifth bit per value): one kernel serves both.
pub trait NibbleBlock: Pod {
    /// Whether values have a fifth bit in [`NibbleBlock::qh`].
    const FIFTH_BIT: bool;
    fn d(&self) -> f16;
    fn dmin(&self) -> f16;
    /// The packed 6-bit sub-block scales and mins.
    fn packed(&self) -> &[u8; 12];
    fn qs(&self) -> &[u8; 128];
    /// Q5_K's fifth bits (see [`BlockQ5K`]); zeros for Q4_K.
    fn qh(&self) -> &[u8; 32];
}

impl NibbleBlock for BlockQ4K {
    const FIFTH_BIT: bool = false;
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    fn packed(&self) -> &[u8; 12] {
        &self.scales
    }
    fn qs(&self) -> &[u8; 128] {
        &self.qs
    }
    fn qh(&self) -> &[u8; 32] {
        &[0; 32]
    }
}

impl NibbleBlock for BlockQ5K {
    const FIFTH_BIT: bool = true;
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    fn packed(&self) -> &[u8; 12] {
        &self.scales
    }
    fn qs(&self) -> &[u8; 128] {
        &self.qs
    }
    fn qh(&self) -> &[u8; 32] {
        &self.qh
    }
}

/// Q5_K: as Q4_K with a fifth bit per value: bit 2g of `qh[l]` is the high bit of value l of
/// sub-block 2g, bit 2g + 1 that of sub-block 2g + 1.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

impl BlockQ5K {
    #[inline]
    pub fn scales(&self) -> ([f32; 8], [f32; 8]) {
        sub_scales(self.d, self.dmin, &self.scales)
    }

    pub fn dequantize(&self, out: &mut [f32]) {
        let (ds, ms) = self.scales();
        for g in 0..4 {
            let q = &self.qs[g * 32..(g + 1) * 32];
            let (lo, hi) = out[g * 64..(g + 1) * 64].split_at_mut(32);
            for l in 0..32 {
                let h0 = ((self.qh[l] >> (2 * g)) & 1) << 4;
                let h1 = ((self.qh[l] >> (2 * g + 1)) & 1) << 4;
                lo[l] = ds[2 * g] * ((q[l] & 0xF) | h0) as f32 - ms[2 * g];
                hi[l] = ds[2 * g + 1] * ((q[l] >> 4) | h1) as f32 - ms[2 * g + 1];
            }
        }
    }
}

/// Q6_K: 256 values in 16 sub-blocks of 16, `x = d·sc_j · (q − 32)`, q in 0..64: low four
/// bits in `ql`, high two in `qh`, 8-bit signed sub-block scales.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}

impl BlockQ6K {
    /// Value `l` (0..32) of each of the four 32-value groups of half `h` (0..2) of the block,
    /// as signed 6-bit integers: groups are values h·128 + {0, 32, 64, 96} + l.
    #[inline]
    pub fn quad(&self, h: usize, l: usize) -> [i8; 4] {
        let ql = &self.ql[h * 64..];
        let qh = self.qh[h * 32 + l];
        [
            ((ql[l] & 0xF) | ((qh & 3) << 4)) as i8 - 32,
            ((ql[l + 32] & 0xF) | (((qh >> 2) & 3) << 4)) as i8 - 32,
            ((ql[l] >> 4) | (((qh >> 4) & 3) << 4)) as i8 - 32,
            ((ql[l + 32] >> 4) | (((qh >> 6) & 3) << 4)) as i8 - 32,
        ]
    }

    pub fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for h in 0..2 {
            let sc = &self.scales[h * 8..];
            let y = &mut out[h * 128..(h + 1) * 128];
            for l in 0..32 {
                let is = l / 16;
                let q = self.quad(h, l);
                for (k, &qk) in q.iter().enumerate() {
                    y[l + 32 * k] = d * sc[is + 2 * k] as f32 * qk as f32;
                }
            }
        }
    }
}

/// Quantizes f32 values to Q8_0 blocks as ggml's reference quantizer does (for tests and
/// test models; the engine reads every format in place).
pub fn quantize_q8_0(data: &[f32]) -> Vec<BlockQ8_0> {
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

/// gguf-py's dequantization of each format, committed by `tests/fixtures/make`.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::Format;

    /// The fixture's blocks and gguf-py's values for them, for each format that has one.
    pub fn all() -> Vec<(Format, Vec<u8>, Vec<f32>)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quants");
        super::FORMATS
            .iter()
            .filter(|f| **f != Format::F32)
            .map(|&f| {
                let read = |ext: &str| {
                    let path = format!("{dir}/{}.{ext}", f.name());
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
                };
                let values = read("f32")
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                (f, read("blocks"), values)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each format's dequantization, value for value and bit for bit, against gguf-py's
    /// numpy reference (llama.cpp's own Python package).
    #[test]
    fn dequantization_matches_gguf_py() {
        let all = fixtures::all();
        assert_eq!(all.len(), FORMATS.len() - 1);
        for (format, blocks, want) in all {
            let mut got = vec![0f32; want.len()];
            format.dequantize(&blocks, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{format:?} value {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn block_sizes_are_ggmls() {
        let want = [
            (Format::Q4_0, 18),
            (Format::Q4_1, 20),
            (Format::Q5_0, 22),
            (Format::Q5_1, 24),
            (Format::Q8_0, 34),
            (Format::Q4K, 144),
            (Format::Q5K, 176),
            (Format::Q6K, 210),
        ];
        for (f, bytes) in want {
            assert_eq!(f.block_bytes(), bytes, "{f:?}");
            let ggml = match f {
                Format::Q4_0 => GgmlDType::Q4_0,
                Format::Q4_1 => GgmlDType::Q4_1,
                Format::Q5_0 => GgmlDType::Q5_0,
                Format::Q5_1 => GgmlDType::Q5_1,
                Format::Q8_0 => GgmlDType::Q8_0,
                Format::Q4K => GgmlDType::Q4K,
                Format::Q5K => GgmlDType::Q5K,
                _ => GgmlDType::Q6K,
            };
            assert_eq!(ggml.type_size(), bytes);
            assert_eq!(ggml.block_size(), f.block_values());
            assert_eq!(Format::from_ggml(ggml), Some(f));
        }
    }
}
