// Host builds of the kernels (see cuda_emu.h), with C entry points for the Rust tests.
// Each entry point takes the launch configuration the Rust launcher computed for the GPU.
#include "cuda_emu.h"

#include "../hadamard.cu"
#include "../quant.cu"
#include "../attend.cu"
#include "../saliency.cu"

extern "C" {

void rkv_emu_fwht(const RkvFwhtParams* p, u64 scratch, unsigned gx, unsigned smem) {
  emu::launch(emu::dim3(gx), RKV_THREADS, smem, [&] { rkv_fwht(*p, scratch); });
}

void rkv_emu_append(const RkvAppendParams* p, unsigned gx, unsigned gy, unsigned smem) {
  emu::launch(emu::dim3(gx, gy), RKV_THREADS, smem, [&] { rkv_append(*p); });
}

void rkv_emu_paged_write(const RkvPagedWriteParams* p, unsigned gx, unsigned gy,
                         unsigned smem) {
  emu::launch(emu::dim3(gx, gy), RKV_THREADS, smem, [&] { rkv_paged_write(*p); });
}

void rkv_emu_channel_keys(const RkvChannelParams* p, unsigned gx, unsigned gy) {
  emu::launch(emu::dim3(gx, gy), RKV_THREADS, 0, [&] { rkv_channel_keys(*p); });
}

void rkv_emu_attend(const RkvAttendParams* p, unsigned gx, unsigned gy, unsigned gz,
                    unsigned smem) {
  emu::launch(emu::dim3(gx, gy, gz), RKV_THREADS, smem, [&] { rkv_attend(*p); });
}

void rkv_emu_combine(const RkvCombineParams* p, unsigned gx, unsigned gy, unsigned smem) {
  emu::launch(emu::dim3(gx, gy), RKV_THREADS, smem, [&] { rkv_combine(*p); });
}

void rkv_emu_mass_lse(const RkvMassParams* p, unsigned gx, unsigned gy, unsigned gz,
                      unsigned smem) {
  emu::launch(emu::dim3(gx, gy, gz), RKV_THREADS, smem, [&] { rkv_mass_lse(*p); });
}

void rkv_emu_mass_keys(const RkvMassParams* p, unsigned gx, unsigned gy, unsigned smem) {
  emu::launch(emu::dim3(gx, gy), RKV_THREADS, smem, [&] { rkv_mass_keys(*p); });
}

// Struct sizes, checked against the Rust mirrors.
u64 rkv_emu_sizeof(int which) {
  switch (which) {
    case 0: return sizeof(RkvLayout);
    case 1: return sizeof(RkvPage);
    case 2: return sizeof(RkvSrc);
    case 3: return sizeof(RkvDst);
    case 4: return sizeof(RkvAppendParams);
    case 5: return sizeof(RkvChannelParams);
    case 6: return sizeof(RkvAttendParams);
    case 7: return sizeof(RkvCombineParams);
    case 8: return sizeof(RkvFwhtParams);
    case 9: return sizeof(RkvMassParams);
    case 10: return sizeof(RkvPagedWriteParams);
    default: return 0;
  }
}
}
