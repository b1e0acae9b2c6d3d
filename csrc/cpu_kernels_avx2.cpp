// AVX2 + FMA copy of the kernels. Only the code below the pragma (at::vec::AVX2 and
// epd_kernels::cpu::AVX2) may use these instructions; ops.cpp calls it only when torch
// reports that the CPU supports AVX2. See cpu_kernels.h.
#include "cpu_kernels.h"

#if EPD_KERNELS_X86_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// at::vec's AVX2 classes name SLEEF functions that sleef.h declares only under __AVX__,
// a macro GCC's C++ front end does not define for `#pragma GCC target`. Define it for
// this include alone: it only exposes prototypes (nothing here calls them).
#ifndef __AVX__
#define __AVX__ 1
#define EPD_KERNELS_UNDEF_AVX
#endif
#include <sleef.h>
#ifdef EPD_KERNELS_UNDEF_AVX
#undef __AVX__
#undef EPD_KERNELS_UNDEF_AVX
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#endif
