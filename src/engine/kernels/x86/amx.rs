//! The prompt kernel on AMX tiles (`tdpbf16ps`, Sapphire Rapids and later Xeons).
//!
//! Why: prompts are compute-bound, and on Intel's AVX-512 cores `vdpbf16ps` is no faster
//! than f32 FMAs (32 multiply-adds a cycle), which left confab reading prompts of K-quant
//! files at ~0.6× llama.cpp's 8-bit `vpdpbusd` there. One `tdpbf16ps` multiplies a
//! 16 × 32 tile of activations with a 32 × 16 tile of weights (8192 multiply-adds; measured
//! ~12× the FMA rate on a 2-core Sapphire Rapids VM).
//!
//! The weights' tile is a bf16 panel as the AVX512_BF16 kernel reads it (a column pair of 16
//! weight rows per 64 bytes is AMX's own layout), with each value's block scale (and
//! minimum) applied and the result rounded to bf16 ([`weights_in_place`]). Applying the
//! scales per 32-column sub-block instead, as the AVX512_BF16 kernel does, would send every
//! tile product out through memory to be scaled: measured, that left the tiles waiting on
//! those stores most of the time (a Llama-3.2-1B-shaped Q4_K_M file read prompts at 158
//! tok/s that way, 307 this way, on the same 2-core VM). Rounding a weight to bf16 moves it by at most 2⁻⁸ of itself — the activations'
//! own rounding, far below the 4-bit quantization step it was stored with — and keeps its
//! exponent, so no outlier is lost. The sums stay f32 across the whole row. Each activation
//! row's results depend on that row alone (a tile's rows are independent), so a sequence's
//! tokens do not depend on what shares its prompt chunk.
//!
//! Rust has no stable AMX intrinsics; the few instructions are written as inline assembly,
//! on fixed tile registers: sums in tmm0–tmm3, activations in tmm4/tmm5, weights in
//! tmm6/tmm7.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Activation rows per tile (and per call of [`gemm16`]).
pub const ROWS: usize = 16;

/// Whether this CPU has AMX-BF16 and the kernel let this process use the tiles.
///
/// Linux hands out the tiles' 8 KiB of register state per process on request
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without it the first tile
/// instruction faults. Asked once; a refusal (an old kernel, a hypervisor that hides the
/// state) leaves the AVX512_BF16 kernel in place.
pub fn usable() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7 exists on every CPU with the AVX-512 kernels (checked by the caller).
        let leaf7 = __cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
        tile && bf16 && request_tiles()
    })
}

/// Asks Linux for the tile data state for this process (all its threads).
#[cfg(target_os = "linux")]
fn request_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which register state the kernel
    // saves for this process; it reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r != 0 {
        tracing::info!(
            error = %std::io::Error::last_os_error(),
            "AMX tiles refused by the kernel; prompts use the AVX512_BF16 kernel"
        );
    }
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tiles() -> bool {
    false
}

/// The tiles' shapes (`ldtilecfg`'s 64-byte operand, palette 1): sums 16 × 16 f32,
/// activations 16 rows × 32 bf16, weights 16 rows of 16 column pairs.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for tile in 0..8 {
            c[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
            c[48 + tile] = ROWS as u8;
        }
        TileConfig(c)
    }
}

/// This thread's tiles, configured while it lives; released on drop (a thread holding tile
/// state makes every context switch save 8 KiB more).
pub struct Tiles(());

impl Tiles {
    /// # Safety
    /// [`usable`] must have returned true.
    pub unsafe fn configure() -> Tiles {
        let config = TileConfig::new();
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured (`configure`), so AMX is usable.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Turns a bf16 panel of exact integers with block scales (`q`, `ds`, `ms` as
/// `bf16::widen` and `bf16::widen_q6k` (from `int8`'s byte panels) and `bf16::q8_0_panel`
/// make them: `G`-column sub-blocks, with minimums if `MINS`) into the weights themselves,
/// `d·q − m` rounded to bf16, in place.
///
/// # Safety
/// AVX512_BF16 must be present; `q` holds `cols × 16` values, `ds`/`ms` `cols / G × 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn weights_in_place<const G: usize, const MINS: bool>(
    q: &mut [u16],
    ds: &[f32],
    ms: &[f32],
    cols: usize,
) {
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    // Each 512-bit vector holds one column pair of the 16 rows: lane j (as 32 bits) is row
    // j, its even column in the low half and its odd column in the high half.
    for (p, v) in q[..cols * 16].chunks_exact_mut(32).enumerate() {
        let sub = p * 2 / G;
        let d = _mm512_loadu_ps(ds.as_ptr().add(sub * 16));
        let raw = _mm512_loadu_si512(v.as_ptr() as *const __m512i);
        let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw));
        let odd = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
        let (even, odd) = if MINS {
            let m = _mm512_loadu_ps(ms.as_ptr().add(sub * 16));
            (_mm512_fmsub_ps(even, d, m), _mm512_fmsub_ps(odd, d, m))
        } else {
            (_mm512_mul_ps(even, d), _mm512_mul_ps(odd, d))
        };
        let round = |f: __m512| {
            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(f),
            ))
        };
        let packed = _mm512_or_si512(round(even), _mm512_slli_epi32::<16>(round(odd)));
        _mm512_storeu_si512(v.as_mut_ptr() as *mut __m512i, packed);
    }
}

/// `out[k][j] = Σ_c x[k][c] · w[j][c]` for 32 activation rows (bf16, two tiles of 16 rows
/// at `x0` and `x1`, row stride `cols`) and two panels of 16 weight rows (bf16 weights as
/// [`weights_in_place`] leaves them, at `w0` and `w1`): `out` gets four 16 × 16 blocks,
/// `out[(a·2 + b)·256 + k·16 + j]` for activation tile a and panel b.
///
/// # Safety
/// AMX usable and `_tiles` configured; `x0`/`x1` point at 16 readable rows of `cols` (a
/// multiple of 32) values, `w0`/`w1` at `cols × 16`.
pub unsafe fn gemm32(
    _tiles: &Tiles,
    x0: *const u16,
    x1: *const u16,
    w0: *const u16,
    w1: *const u16,
    cols: usize,
    out: &mut [f32; 1024],
) {
    debug_assert!(cols.is_multiple_of(32) && cols > 0);
    let o = out.as_mut_ptr();
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{x0} + {xs}]",
        "tileloadd tmm6, [{w0} + {ws}]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{w1} + {ws}]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{x1} + {xs}]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {x0}, 64",
        "add {x1}, 64",
        "add {w0}, 1024",
        "add {w1}, 1024",
        "dec {k}",
        "jnz 2b",
        "tilestored [{o} + {ws}], tmm0",
        "add {o}, 1024",
        "tilestored [{o} + {ws}], tmm1",
        "add {o}, 1024",
        "tilestored [{o} + {ws}], tmm2",
        "add {o}, 1024",
        "tilestored [{o} + {ws}], tmm3",
        x0 = inout(reg) x0 => _,
        x1 = inout(reg) x1 => _,
        w0 = inout(reg) w0 => _,
        w1 = inout(reg) w1 => _,
        k = inout(reg) cols / 32 => _,
        o = inout(reg) o => _,
        xs = in(reg) cols * 2,
        ws = in(reg) 64usize,
        options(nostack),
    );
}
