//! The kernels built as host C++ (`cuda/emu`), for tests on machines without a GPU. Pointers
//! in the parameter structs are host addresses here.

use super::abi::*;

extern "C" {
    fn rkv_emu_fwht(p: *const RkvFwhtParams, scratch: u64, gx: u32, smem: u32);
    fn rkv_emu_append(p: *const RkvAppendParams, gx: u32, gy: u32, smem: u32);
    fn rkv_emu_paged_write(p: *const RkvPagedWriteParams, gx: u32, gy: u32, smem: u32);
    fn rkv_emu_channel_keys(p: *const RkvChannelParams, gx: u32, gy: u32);
    fn rkv_emu_attend(p: *const RkvAttendParams, gx: u32, gy: u32, gz: u32, smem: u32);
    fn rkv_emu_combine(p: *const RkvCombineParams, gx: u32, gy: u32, smem: u32);
    fn rkv_emu_mass_lse(p: *const RkvMassParams, gx: u32, gy: u32, gz: u32, smem: u32);
    fn rkv_emu_mass_keys(p: *const RkvMassParams, gx: u32, gy: u32, smem: u32);
    fn rkv_emu_sizeof(which: i32) -> u64;
}

/// `sizeof` of the header's structs, in the order of [`super::abi`]'s definitions.
pub fn c_sizes() -> [u64; 11] {
    // SAFETY: a pure function of its argument.
    std::array::from_fn(|i| unsafe { rkv_emu_sizeof(i as i32) })
}

/// Runs `rkv_fwht`; the caller's pointers must cover `rows * n` elements.
///
/// # Safety
/// `p.x`, `p.y` (and `scratch` when non-zero, `gx * n` floats) must be valid host buffers.
pub unsafe fn fwht(p: &RkvFwhtParams, scratch: u64, gx: u32, smem: usize) {
    // SAFETY: the caller guarantees the buffers (see above).
    unsafe { rkv_emu_fwht(p, scratch, gx, smem as u32) }
}

/// Runs `rkv_append`.
///
/// # Safety
/// Every address in `p`, its sources and destinations must be valid host memory.
pub unsafe fn append(p: &RkvAppendParams, grid: [u32; 3], smem: usize) {
    // SAFETY: the caller guarantees the buffers.
    unsafe { rkv_emu_append(p, grid[0], grid[1], smem as u32) }
}

/// Runs `rkv_paged_write`.
///
/// # Safety
/// Every address in `p` must be valid host memory of the sizes `p` implies.
pub unsafe fn paged_write(p: &RkvPagedWriteParams, grid: [u32; 3], smem: usize) {
    // SAFETY: the caller guarantees the buffers.
    unsafe { rkv_emu_paged_write(p, grid[0], grid[1], smem as u32) }
}

/// Runs `rkv_channel_keys` over `n_pages x heads` blocks.
///
/// # Safety
/// Every address in `p` must be valid host memory.
pub unsafe fn channel_keys(p: &RkvChannelParams) {
    // SAFETY: the caller guarantees the buffers.
    unsafe { rkv_emu_channel_keys(p, p.n_pages as u32, p.heads as u32) }
}

/// Runs `rkv_attend`.
///
/// # Safety
/// Every address in `p` (pages included) must be valid host memory.
pub unsafe fn attend(p: &RkvAttendParams, grid: [u32; 3], smem: usize) {
    // SAFETY: the caller guarantees the buffers.
    unsafe { rkv_emu_attend(p, grid[0], grid[1], grid[2], smem as u32) }
}

/// Runs `rkv_combine` over `(Hq * Tq, B)` blocks.
///
/// # Safety
/// `p.work` and `p.out` must be valid host memory of the sizes `p` implies.
pub unsafe fn combine(p: &RkvCombineParams) {
    // SAFETY: the caller guarantees the buffers.
    unsafe { rkv_emu_combine(p, (p.hq * p.tq) as u32, p.batch as u32, (p.d * 4) as u32) }
}

/// Runs `rkv_mass_lse` or, with `keys`, `rkv_mass_keys`.
///
/// # Safety
/// Every address in `p` must be valid host memory of the sizes `p` implies.
pub unsafe fn mass(p: &RkvMassParams, keys: bool, grid: [u32; 3], smem: usize) {
    // SAFETY: the caller guarantees the buffers.
    unsafe {
        if keys {
            rkv_emu_mass_keys(p, grid[0], grid[1], smem as u32)
        } else {
            rkv_emu_mass_lse(p, grid[0], grid[1], grid[2], smem as u32)
        }
    }
}
