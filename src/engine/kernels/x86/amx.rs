//! The prompt kernel on AMX tiles (`tdpbf16ps`, Sapphire Rapids and later Xeons).
//!
//! Why: prompts are compute-bound, and on Intel's AVX-512 cores `vdpbf16ps` is no faster
//! than f32 FMAs (32 multiply-adds a cycle), which left confab reading prompts of K-quant
//! files at ~0.6× llama.cpp's 8-bit `vpdpbusd` there. One `tdpbf16ps` multiplies a
//! 16 × 32 tile of activations with a 32 × 16 tile of weights (8192 multiply-adds; measured
//! ~12× the FMA rate on a 2-core Sapphire Rapids VM). It reads the bf16 panels the
//! AVX512_BF16 kernel reads — their layout (a column pair of 16 weight rows per 64 bytes) is
//! AMX's own for the weights' tile — so the arithmetic is the same: exact weight values,
//! activations rounded to bf16 once per product, f32 sums, each sub-block's f32 scale (and
//! minimum) applied per sub-block. Only the order of the additions inside a sub-block
//! differs. Each activation row's results depend on that row alone (a tile's rows are
//! independent), so a sequence's tokens do not depend on what shares its prompt chunk.
//!
//! Rust has no stable AMX intrinsics; the few instructions are written as inline assembly,
//! on fixed tile registers: sums in tmm0/tmm1, activations in tmm4/tmm5, weights in
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

/// The tiles' shapes (`ldtilecfg`'s 64-byte operand, palette 1) for sub-blocks of `G`
/// columns: sums 16 × 16 f32, activations 16 rows × G bf16, weights G/2 rows of 16 column
/// pairs.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(g: usize) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut shape = |tile: usize, rows: usize, bytes: usize| {
            c[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + tile] = rows as u8;
        };
        for t in [0, 1] {
            shape(t, ROWS, 64);
        }
        for t in [4, 5] {
            shape(t, ROWS, 2 * g);
        }
        for t in [6, 7] {
            shape(t, g / 2, 64);
        }
        TileConfig(c)
    }
}

/// This thread's tiles, configured for sub-blocks of `G` columns while it lives; released
/// on drop (a thread holding tile state makes every context switch save 8 KiB more).
pub struct Tiles<const G: usize>(());

impl<const G: usize> Tiles<G> {
    /// # Safety
    /// [`usable`] must have returned true.
    pub unsafe fn configure() -> Tiles<G> {
        let config = TileConfig::new(G);
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        Tiles(())
    }
}

impl<const G: usize> Drop for Tiles<G> {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured (`configure`), so AMX is usable.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// 16 f32 sums (16 activation rows × 16 weight rows) of one or two sub-blocks, as the tiles
/// left them: `c[h][k·16 + j]`.
#[repr(C, align(64))]
struct Sums([[f32; 256]; 2]);

/// `out[k][j] = Σ_c x[k][c] · w[j][c]` for the 16 activation rows at `xb` (bf16, row stride
/// `cols`, with their 32-value sums `xsum`, `cols / 32` per row) and the 16 weight rows of a
/// bf16 panel (`q`, `ds`, `ms` as `bf16::q4k_panel` and its siblings make them: `G`-column
/// sub-blocks, with minimums if `MINS`); rows `0..m` of the result go to `out + k·ld`.
///
/// # Safety
/// AMX usable and `tiles` configured for `G`; `xb` holds 16 rows of `cols` values and
/// `xsum` their sums (rows past `m` may be anything); `out` has room for m rows of 16 at
/// stride `ld`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn gemm16<const G: usize, const MINS: bool>(
    _tiles: &Tiles<G>,
    m: usize,
    q: &[u16],
    ds: &[f32],
    ms: &[f32],
    xb: &[u16],
    xsum: &[f32],
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(xb.len() >= ROWS * cols && xsum.len() >= ROWS * cols / 32);
    debug_assert!(q.len() >= cols * 16);
    let subs = cols / G;
    let zero = _mm512_setzero_ps();
    let mut acc = [zero; ROWS];
    let mut sums = Sums([[0.0; 256]; 2]);
    let (x_stride, w_stride) = (cols * 2, 64usize);
    let mut s = 0;
    while s < subs {
        let x0 = xb.as_ptr().add(s * G);
        let w0 = q.as_ptr().add(s * G * 16);
        let pair = s + 1 < subs;
        if pair {
            asm!(
                "tileloadd tmm4, [{x0} + {xs}]",
                "tileloadd tmm6, [{w0} + {ws}]",
                "tilezero tmm0",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{x1} + {xs}]",
                "tileloadd tmm7, [{w1} + {ws}]",
                "tilezero tmm1",
                "tdpbf16ps tmm1, tmm5, tmm7",
                "tilestored [{c0} + {ws}], tmm0",
                "tilestored [{c1} + {ws}], tmm1",
                x0 = in(reg) x0,
                x1 = in(reg) x0.add(G),
                w0 = in(reg) w0,
                w1 = in(reg) w0.add(G * 16),
                xs = in(reg) x_stride,
                ws = in(reg) w_stride,
                c0 = in(reg) sums.0[0].as_mut_ptr(),
                c1 = in(reg) sums.0[1].as_mut_ptr(),
                options(nostack),
            );
        } else {
            asm!(
                "tileloadd tmm4, [{x0} + {xs}]",
                "tileloadd tmm6, [{w0} + {ws}]",
                "tilezero tmm0",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tilestored [{c0} + {ws}], tmm0",
                x0 = in(reg) x0,
                w0 = in(reg) w0,
                xs = in(reg) x_stride,
                ws = in(reg) w_stride,
                c0 = in(reg) sums.0[0].as_mut_ptr(),
                options(nostack),
            );
        }
        for (h, c) in sums.0.iter().enumerate().take(1 + pair as usize) {
            let sub = s + h;
            let d = _mm512_loadu_ps(ds.as_ptr().add(sub * 16));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_load_ps(c.as_ptr().add(k * 16)), d, *a);
            }
            if MINS {
                let mn = _mm512_loadu_ps(ms.as_ptr().add(sub * 16));
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fnmadd_ps(mn, _mm512_set1_ps(xsum[k * subs + sub]), *a);
                }
            }
        }
        s += 2;
    }
    for (k, a) in acc.iter().enumerate().take(m) {
        _mm512_storeu_ps(out.add(k * ld), *a);
    }
}
