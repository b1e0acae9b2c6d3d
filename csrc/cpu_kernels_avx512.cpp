// AVX-512 copy of the kernels (the F/BW/VL/DQ subset torch's own AVX512 kernels use).
// Only the code below the pragma (at::vec::AVX512 and epd_kernels::cpu::AVX512) may use
// these instructions; ops.cpp calls it only when torch reports AVX512. See cpu_kernels.h.
#include "cpu_kernels.h"

#if EPD_KERNELS_X86_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#endif
