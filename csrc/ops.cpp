// The op library `epd_kernels`: every op's schema (defined here, once) and its CPU
// kernels (input checks, output allocation, the choice of the instruction-set copy). The
// CUDA kernels (Triton) are registered by epd_kernels/backends.py, the fake kernels and
// autograd by epd_kernels/ops.py, which also brings user inputs to the canonical shapes
// below; the checks here repeat that contract so that a direct call with bad inputs fails
// with a message instead of reading out of bounds. The library has no Python module
// init: epd_kernels/_extension.py loads it with torch.ops.load_library.
//
// Canonical shapes (T = data dtype, A = opmath dtype: double for double, else float):
//   x, d, grad_out (step) [B, N] T        grads, grad_out (branches) [K, B, N] T
//   weights, c            [K] or [B, K] A  ([K]: the same K values for every row)
//   scale                 None, [] or [B] A   alpha: a float
//   epd_step: y[b, n] = x[b, n] + alpha * scale[b] * sum_k weights[b, k] * grads[k, b, n]
// Uniform coefficients thus travel as a [K] tensor and a float, never expanded.
#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu_kernels.h"

namespace epd_kernels {

// ---------------------------------------------------------------------------------
// Streaming-store policy (called by the kernels; compiled for the baseline ISA).
//
// Streaming (non-temporal) stores skip the read-for-ownership of each output line, so a
// copy-like kernel moves up to a third fewer bytes, but the data leaves the cache.
// Measured on the build machine (Xeon VM, single thread, fp32, K = 2..4):
//   * into memory that is already resident (branch_states_out's reused static batch, or
//     outputs from an allocator that recycles large blocks) streaming is 1.2x faster for
//     epd_step_fwd including the consumer's read, and up to 1.9x faster for the kernel
//     alone, at 64 and 128 MiB;
//   * into fresh pages it is 1.35x slower: glibc maps every block above 32 MiB anew, and
//     the OS zeroes each page through the cache on first touch;
//   * smaller outputs may stay in the last-level cache for the op that reads them next.
// Hence: stream when at least kStreamMinBytes are written into pages that are already
// resident (sampled with mincore). EPD_KERNELS_STREAMING=always|never overrides (the
// tests use `always` to exercise the streaming paths on small tensors).
namespace cpu {
namespace {

constexpr int64_t kStreamMinBytes = int64_t(64) << 20;

enum class StreamMode { kAuto, kAlways, kNever };

StreamMode stream_mode() {
  static const StreamMode mode = [] {
    const char* env = std::getenv("EPD_KERNELS_STREAMING");
    if (env == nullptr || std::strcmp(env, "auto") == 0) return StreamMode::kAuto;
    if (std::strcmp(env, "always") == 0) return StreamMode::kAlways;
    if (std::strcmp(env, "never") == 0) return StreamMode::kNever;
    TORCH_WARN("EPD_KERNELS_STREAMING=", env, " is not one of auto, always, never; using auto");
    return StreamMode::kAuto;
  }();
  return mode;
}

// Whether the pages at the start, middle and end of [ptr, ptr + bytes) are mapped in.
bool pages_resident(const void* ptr, int64_t bytes) {
#if defined(__linux__)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(ptr);
  for (uintptr_t at : {begin, begin + bytes / 2, begin + bytes - 1}) {
    unsigned char resident = 0;
    if (mincore(reinterpret_cast<void*>(at & ~(page - 1)), 1, &resident) != 0 ||
        (resident & 1) == 0) {
      return false;
    }
  }
  return true;
#else
  (void)ptr;
  (void)bytes;
  return false;
#endif
}

}  // namespace

bool want_streaming_stores(int64_t bytes, std::initializer_list<const void*> outs) {
  switch (stream_mode()) {
    case StreamMode::kAlways: return true;
    case StreamMode::kNever: return false;
    default: break;
  }
  if (bytes < kStreamMinBytes) return false;
  for (const void* p : outs) {
    if (!pages_resident(p, bytes / static_cast<int64_t>(outs.size()))) return false;
  }
  return true;
}

}  // namespace cpu

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------
// Validation.

at::ScalarType opmath_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const Tensor& t, const char* op, const char* name, at::IntArrayRef shape,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Checks a [B, N] data input (x, d or grad_out); returns its dtype.
at::ScalarType check_rows(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
  check_tensor(t, op, name, t.sizes(), dt);
  return dt;
}

// Checks coefficients ([K] or [B, K]: weights, c) and scale ([] or [B]) in opmath.
void check_coefs(const char* op, const char* name, const Tensor& w, int64_t B, int64_t K,
                 at::ScalarType dt) {
  TORCH_CHECK(w.dim() == 1 || w.dim() == 2, op, ": ", name, " must be [K] or [B, K], got shape ",
              w.sizes());
  check_tensor(w, op, name, w.dim() == 1 ? std::vector<int64_t>{K} : std::vector<int64_t>{B, K},
               opmath_of(dt));
}

void check_scale(const char* op, const std::optional<Tensor>& scale, int64_t B,
                 at::ScalarType dt) {
  if (!scale.has_value()) return;
  const bool per_row = scale->dim() != 0;
  check_tensor(*scale, op, "scale", per_row ? std::vector<int64_t>{B} : std::vector<int64_t>{},
               opmath_of(dt));
}

// ---------------------------------------------------------------------------------
// Instruction-set choice: follow torch's own CPU capability (which honours the
// ATEN_CPU_CAPABILITY environment variable), read once.

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa cpu_isa() {
  static const Isa isa = [] {
#if EPD_KERNELS_X86_ISA_COPIES
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::kAvx512;
    if (cap == "AVX2") return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

// Calls kernel `fn` of the instruction-set copy chosen for this CPU.
#if EPD_KERNELS_X86_ISA_COPIES
#define EPD_KERNELS_CALL(fn, ...)                                    \
  switch (cpu_isa()) {                                               \
    case Isa::kAvx512: cpu::AVX512::fn(__VA_ARGS__); break;          \
    case Isa::kAvx2: cpu::AVX2::fn(__VA_ARGS__); break;              \
    default: cpu::DEFAULT::fn(__VA_ARGS__);                          \
  }
#else
#define EPD_KERNELS_CALL(fn, ...) cpu::DEFAULT::fn(__VA_ARGS__);
#endif

// ---------------------------------------------------------------------------------
// Ops.

// Checks the inputs of epd_step / epd_step_backward; `data` is x or grad_out ([B, N]).
// Returns K.
int64_t check_step_inputs(const char* op, const char* data_name, const Tensor& data,
                          const Tensor& grads, const Tensor& weights,
                          const std::optional<Tensor>& scale) {
  const auto dt = check_rows(data, op, data_name);
  const int64_t B = data.size(0), N = data.size(1);
  TORCH_CHECK(grads.dim() == 3, op, ": grads must be 3-D [K, B, N], got shape ", grads.sizes());
  const int64_t K = grads.size(0);
  TORCH_CHECK(K >= 1, op, ": grads has K = 0 branches, need at least one");
  check_tensor(grads, op, "grads", {K, B, N}, dt);
  check_coefs(op, "weights", weights, B, K, dt);
  check_scale(op, scale, B, dt);
  return K;
}

Tensor scale_or_undefined(const std::optional<Tensor>& scale) {
  return scale.has_value() ? *scale : Tensor();
}

Tensor epd_step(const Tensor& x, const Tensor& grads, const Tensor& weights,
                const std::optional<Tensor>& scale, double alpha) {
  check_step_inputs("epd_step", "x", x, grads, weights, scale);
  Tensor y = at::empty(x.sizes(), x.options());
  EPD_KERNELS_CALL(epd_step_fwd, x, grads, weights, scale_or_undefined(scale), alpha, y)
  return y;
}

// The result is written into `out`, which may be x itself (each element of y depends
// only on the same element of x and grads, read before it is written) but must not
// overlap anything else.
void epd_step_out(const Tensor& x, const Tensor& grads, const Tensor& weights,
                  const std::optional<Tensor>& scale, double alpha, const Tensor& out) {
  const char* op = "epd_step_out";
  check_step_inputs(op, "x", x, grads, weights, scale);
  check_tensor(out, op, "out", x.sizes(), x.scalar_type());
  const auto with_x = at::get_overlap_status(out, x);
  TORCH_CHECK(with_x == at::MemOverlapStatus::No || with_x == at::MemOverlapStatus::Full,
              op, ": out partially overlaps x; it must be x itself or separate memory");
  at::assert_no_overlap(out, grads);
  at::assert_no_overlap(out, weights);
  if (scale.has_value()) at::assert_no_overlap(out, *scale);
  EPD_KERNELS_CALL(epd_step_fwd, x, grads, weights, scale_or_undefined(scale), alpha, out)
}

// Returns grad_grads [K, B, N] (T) and dots [B, K] (A) with
// dots[b, k] = sum_n grad_out[b, n] * grads[k, b, n].
std::tuple<Tensor, Tensor> epd_step_backward(const Tensor& grad_out, const Tensor& grads,
                                             const Tensor& weights,
                                             const std::optional<Tensor>& scale,
                                             double alpha) {
  const int64_t K =
      check_step_inputs("epd_step_backward", "grad_out", grad_out, grads, weights, scale);
  Tensor grad_grads = at::empty(grads.sizes(), grads.options());
  Tensor dots = at::empty({grad_out.size(0), K}, weights.options());
  EPD_KERNELS_CALL(epd_step_bwd, grad_out, grads, weights, scale_or_undefined(scale), alpha,
                   grad_grads, dots)
  return {grad_grads, dots};
}

// Checks x/d/c of branch_states; returns K.
int64_t check_branch_inputs(const char* op, const Tensor& x, const Tensor& d, const Tensor& c) {
  const auto dt = check_rows(x, op, "x");
  const int64_t B = x.size(0), N = x.size(1);
  check_tensor(d, op, "d", {B, N}, dt);
  TORCH_CHECK(c.dim() == 1 || c.dim() == 2, op, ": c must be [K] or [B, K], got shape ",
              c.sizes());
  const int64_t K = c.size(-1);
  TORCH_CHECK(K >= 1, op, ": c has K = 0 branch offsets, need at least one");
  check_coefs(op, "c", c, B, K, dt);
  return K;
}

Tensor branch_states(const Tensor& x, const Tensor& d, const Tensor& c) {
  const int64_t K = check_branch_inputs("branch_states", x, d, c);
  Tensor out = at::empty({K, x.size(0), x.size(1)}, x.options());
  EPD_KERNELS_CALL(branch_states, x, d, c, out)
  return out;
}

// Writes the [K, B, N] branch states into any contiguous buffer with K*B*N elements
// (e.g. the static [K*B, C, H, W] batch that the denoiser reads).
void branch_states_out(const Tensor& x, const Tensor& d, const Tensor& c, const Tensor& out) {
  const char* op = "branch_states_out";
  const int64_t K = check_branch_inputs(op, x, d, c);
  check_tensor(out, op, "out", out.sizes(), x.scalar_type());  // any shape: numel below
  TORCH_CHECK(out.numel() == K * x.numel(), op, ": out must have K*B*N = ", K * x.numel(),
              " elements, got ", out.numel(), " (shape ", out.sizes(), ")");
  // Branch k is written while x and d are still being read.
  at::assert_no_overlap(out, x);
  at::assert_no_overlap(out, d);
  at::assert_no_overlap(out, c);
  EPD_KERNELS_CALL(branch_states, x, d, c, out)
}

// Returns grad_x, grad_d [B, N] (T) and grad_c [B, K] (A, one row per sample even when
// c is [K]: the caller sums it).
std::tuple<Tensor, Tensor, Tensor> branch_states_backward(const Tensor& grad_out,
                                                          const Tensor& d, const Tensor& c) {
  const char* op = "branch_states_backward";
  const int64_t K = check_branch_inputs(op, d, d, c);
  const int64_t B = d.size(0), N = d.size(1);
  check_tensor(grad_out, op, "grad_out", {K, B, N}, d.scalar_type());
  Tensor grad_x = at::empty({B, N}, d.options());
  Tensor grad_d = at::empty({B, N}, d.options());
  Tensor grad_c = at::empty({B, K}, c.options());
  EPD_KERNELS_CALL(branch_states_bwd, grad_out, d, c, grad_x, grad_d, grad_c)
  return {grad_x, grad_d, grad_c};
}

#undef EPD_KERNELS_CALL

}  // namespace
}  // namespace epd_kernels

TORCH_LIBRARY(epd_kernels, m) {
  m.def("epd_step(Tensor x, Tensor grads, Tensor weights, Tensor? scale, float alpha) -> Tensor");
  m.def("epd_step_out(Tensor x, Tensor grads, Tensor weights, Tensor? scale, float alpha, "
        "Tensor(a!) out) -> ()");
  m.def("epd_step_backward(Tensor grad_out, Tensor grads, Tensor weights, Tensor? scale, "
        "float alpha) -> (Tensor, Tensor)");
  m.def("branch_states(Tensor x, Tensor d, Tensor c) -> Tensor");
  m.def("branch_states_out(Tensor x, Tensor d, Tensor c, Tensor(a!) out) -> ()");
  m.def("branch_states_backward(Tensor grad_out, Tensor d, Tensor c) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(epd_kernels, CPU, m) {
  m.impl("epd_step", &epd_kernels::epd_step);
  m.impl("epd_step_out", &epd_kernels::epd_step_out);
  m.impl("epd_step_backward", &epd_kernels::epd_step_backward);
  m.impl("branch_states", &epd_kernels::branch_states);
  m.impl("branch_states_out", &epd_kernels::branch_states_out);
  m.impl("branch_states_backward", &epd_kernels::branch_states_backward);
}
