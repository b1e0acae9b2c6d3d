// AVX-512 copy of the kernels (the F/BW/VL/DQ subset torch's own AVX512 kernels use).
// Only the code below the pragma (at::vec::AVX512 and epd_kernels::cpu::AVX512) may use
// these instructions; ops.cpp calls it only when torch reports AVX512. See cpu_kernels.h.
#include "cpu_kernels.h"

#if EPD_KERNELS_X86_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

// at::vec's AVX512 classes name SLEEF functions that sleef.h declares only under
// __AVX512F__ (and __AVX__), macros GCC's C++ front end does not define for
// `#pragma GCC target`. Define them for this include alone: it only exposes prototypes
// (nothing here calls them).
#ifndef __AVX__
#define __AVX__ 1
#define EPD_KERNELS_UNDEF_AVX
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#define EPD_KERNELS_UNDEF_AVX512F
#endif
#include <sleef.h>
#ifdef EPD_KERNELS_UNDEF_AVX
#undef __AVX__
#undef EPD_KERNELS_UNDEF_AVX
#endif
#ifdef EPD_KERNELS_UNDEF_AVX512F
#undef __AVX512F__
#undef EPD_KERNELS_UNDEF_AVX512F
#endif

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#endif
