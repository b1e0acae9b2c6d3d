// Declarations shared by the op layer (ops.cpp) and the per-instruction-set kernel
// translation units (cpu_kernels_<isa>.cpp).
//
// Why several translation units: setup.py compiles for the baseline x86-64 ISA so that a
// wheel runs everywhere, but at::vec::Vectorized only becomes real SIMD code when the
// CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 macros are set and the compiler may emit
// those instructions. Like ATen's own DispatchStub, the kernels are therefore compiled
// once per instruction set (each copy in its own namespace, so no symbol is shared
// between copies) and ops.cpp picks one at run time from torch's CPU capability.
//
// Every header the kernels need, other than at::vec, is included HERE, before an ISA
// translation unit switches the compiler's target. Inline functions from these headers
// are thus compiled for the baseline ISA in every translation unit; only code in the
// at::vec::<ISA> and epd_kernels::cpu::<ISA> namespaces (unique names) uses AVX.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <vector>

// The per-ISA copies rely on GCC's `#pragma GCC target`; other compilers (and other
// architectures) build the portable copy only.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define EPD_KERNELS_X86_ISA_COPIES 1
#else
#define EPD_KERNELS_X86_ISA_COPIES 0
#endif

namespace epd_kernels::cpu {

// Inputs are validated and outputs allocated by ops.cpp; the kernels only compute.
// All tensors are contiguous CPU tensors with the shapes documented in ops.cpp; an
// undefined `scale` means 1 for every row.
#define EPD_KERNELS_DECLARE_CPU_KERNELS                                                 \
  void epd_step_fwd(const at::Tensor& x, const at::Tensor& grads,                      \
                    const at::Tensor& weights, const at::Tensor& scale, double alpha,   \
                    const at::Tensor& y);                                               \
  void epd_step_bwd(const at::Tensor& grad_out, const at::Tensor& grads,               \
                    const at::Tensor& weights, const at::Tensor& scale, double alpha,   \
                    const at::Tensor& grad_grads, const at::Tensor& dots);              \
  void branch_states(const at::Tensor& x, const at::Tensor& d, const at::Tensor& c,     \
                     const at::Tensor& out);                                            \
  void branch_states_bwd(const at::Tensor& grad_out, const at::Tensor& d,              \
                         const at::Tensor& c, const at::Tensor& grad_x,                 \
                         const at::Tensor& grad_d, const at::Tensor& grad_c);

namespace DEFAULT {
EPD_KERNELS_DECLARE_CPU_KERNELS
}
#if EPD_KERNELS_X86_ISA_COPIES
namespace AVX2 {
EPD_KERNELS_DECLARE_CPU_KERNELS
}
namespace AVX512 {
EPD_KERNELS_DECLARE_CPU_KERNELS
}
#endif

#undef EPD_KERNELS_DECLARE_CPU_KERNELS

// Whether elementwise outputs of `bytes` in total, split evenly between the buffers
// starting at `outs`, should be written with streaming (non-temporal) stores. Defined
// in ops.cpp, i.e. compiled for the baseline ISA; see there for the policy.
bool want_streaming_stores(int64_t bytes, std::initializer_list<const void*> outs);

}  // namespace epd_kernels::cpu
