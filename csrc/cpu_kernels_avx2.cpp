// AVX2 + FMA copy of the kernels. Only the code below the pragma (at::vec::AVX2 and
// epd_kernels::cpu::AVX2) may use these instructions; ops.cpp calls it only when torch
// reports that the CPU supports AVX2. See cpu_kernels.h.
#include "cpu_kernels.h"

#if EPD_KERNELS_X86_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#endif
