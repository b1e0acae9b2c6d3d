// The CPU kernels proper. Included once per instruction set by cpu_kernels_<isa>.cpp,
// with CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and the compiler's target set; see
// cpu_kernels.h for why.
// No include guard on purpose, and no namespace-scope object needing a run-time
// initialiser: such code would run at load time with AVX instructions on any CPU.
//
// All four ops are memory bound (one fused multiply-add per element and stream), so
// the design goal is to touch each byte of DRAM exactly once:
//   * parallelise over the flattened [B, N] index space, not over rows, so that both
//     B = 1 with a huge N and a large B with a tiny N keep every core busy;
//   * split each thread's range into row segments and hoist the per-row coefficients
//     ((1 + o) * h * w[k], or c[k]) into vector registers once per segment;
//   * do all maths in opmath (float for half/bfloat16/float, double for double),
//     converting reduced types to float vectors on load and back on store;
//   * backward ops produce their elementwise outputs and their per-row reductions in
//     one sweep (block by block, the second use of a block hitting cache), so the
//     inputs are read from memory once.

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including cpu_kernels_impl.h"
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// at::vec's AVX classes name SLEEF functions that sleef.h declares only under __AVX__ (and
// __AVX512F__), macros GCC's C++ front end does not define for `#pragma GCC target`.
// Define them for this include alone: it only exposes prototypes (nothing here calls them).
#ifndef __AVX__
#define __AVX__ 1
#define EPD_KERNELS_UNDEF_AVX
#endif
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define EPD_KERNELS_UNDEF_AVX512F
#endif
#include <sleef.h>
#ifdef EPD_KERNELS_UNDEF_AVX
#undef __AVX__
#endif
#ifdef EPD_KERNELS_UNDEF_AVX512F
#undef __AVX512F__
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace epd_kernels::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements per parallel task of the elementwise passes: big enough that OpenMP
// overhead vanishes, small enough that tiny inputs stay on one thread.
constexpr int64_t kGrain = 32768;
// Reductions use fixed chunks (independent of the thread count) so that the result is
// bitwise reproducible whatever the number of threads.
constexpr int64_t kReduceChunk = 16384;
// Backward ops work on blocks of kBlock elements of a row segment: one pass writes the
// elementwise outputs, a second pass re-reads the block (now in L1, so no extra DRAM
// traffic) for the K dot products. Keeping the two apart leaves a single loop-carried
// accumulator per loop; K accumulators carried through one loop were kept in memory by
// GCC (a store-to-load chain per iteration). The float partial of each block is added
// to a double: a vector lane sums at most 128 products, so fp32 reductions over
// millions of elements stay as accurate as a pairwise sum. (Blocks of 4 KiB for every
// dtype, i.e. 2048 bfloat16 elements, measured no different.)
constexpr int64_t kBlock = 1024;

// One "pack": the elements of one Vectorized<T>, held as opmath vectors. Half and
// bfloat16 widen to two float vectors; float and double are a single vector.
template <typename T>
struct Pack {
  using A = at::opmath_type<T>;
  using VA = Vectorized<A>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;
  static constexpr int kParts = kReduced ? 2 : 1;
  static constexpr int64_t kSize = Vectorized<T>::size();
  static_assert(kSize == kParts * VA::size(), "unexpected vector widths");

  struct V {
    VA p[kParts];
  };

  // `n < kSize` only for the tail of a segment; lanes past n load as zero, which
  // reductions rely on. In the main loops n is the constant kSize, so the branch folds.
  static inline V load(const T* ptr, int64_t n = kSize) {
    V v;
    if constexpr (kReduced) {
      auto raw = n == kSize ? Vectorized<T>::loadu(ptr) : Vectorized<T>::loadu(ptr, n);
      std::tie(v.p[0], v.p[1]) = at::vec::convert_to_float<T>(raw);
    } else {
      v.p[0] = n == kSize ? VA::loadu(ptr) : VA::loadu(ptr, n);
    }
    return v;
  }

  static inline void store(T* ptr, const V& v, int64_t n = kSize) {
    if constexpr (kReduced) {
      auto raw = at::vec::convert_from_float<T>(v.p[0], v.p[1]);
      n == kSize ? raw.store(ptr) : raw.store(ptr, n);
    } else {
      n == kSize ? v.p[0].store(ptr) : v.p[0].store(ptr, n);
    }
  }

  // Streaming stores exist for the AVX2/AVX-512 copies only; they need an address
  // aligned to the full vector.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static constexpr bool kCanStream = true;
#else
  static constexpr bool kCanStream = false;
#endif
  static constexpr int64_t kAlign = kSize * sizeof(T);

  // Stores n elements (a full pack when the tag is true_type, then streaming).
  template <typename Stream>
  static inline void put(T* ptr, const V& v, int64_t n, Stream) {
    if constexpr (Stream::value) {
      store_stream(ptr, v);
    } else {
      store(ptr, v, n);
    }
  }

  static inline void store_stream(T* ptr, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kReduced) {
      const __m512i raw = at::vec::convert_from_float<T>(v.p[0], v.p[1]);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(ptr), raw);
    } else if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(ptr, v.p[0]);
    } else {
      _mm512_stream_pd(ptr, v.p[0]);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kReduced) {
      const __m256i raw = at::vec::convert_from_float<T>(v.p[0], v.p[1]);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(ptr), raw);
    } else if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(ptr, v.p[0]);
    } else {
      _mm256_stream_pd(ptr, v.p[0]);
    }
#else
    store(ptr, v);
#endif
  }

  static inline V broadcast(A a) {
    V v;
    for (int j = 0; j < kParts; ++j) v.p[j] = VA(a);
    return v;
  }
};

// Streaming stores are weakly ordered: each thread fences them before the results are
// handed to other threads (and to the caller).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Whether outputs of `bytes` in total get streaming stores (policy: ops.cpp). Every
// output stream of one loop (`out`, `out2`, and the branches `kstride` elements apart)
// must be equally misaligned, so that the single alignment peel of for_each_pack
// serves them all.
template <typename T>
inline bool use_streaming(int64_t bytes, int64_t kstride, const T* out,
                          const T* out2 = nullptr) {
  using P = Pack<T>;
  if (!P::kCanStream || (kstride * int64_t(sizeof(T))) % P::kAlign != 0) return false;
  auto misalign = [](const T* p) { return reinterpret_cast<uintptr_t>(p) % P::kAlign; };
  if (out2 == nullptr) return want_streaming_stores(bytes, {out});
  return misalign(out2) == misalign(out) && want_streaming_stores(bytes, {out, out2});
}

// Runs body(i, n, tag) over [0, len) in packs; n < kSize only for a ragged head or tail.
// With `stream`, a head is peeled until `out + i` is vector aligned and the full packs
// after it get tag true_type (streaming stores); otherwise every tag is false_type.
template <typename T, typename Body>
inline void for_each_pack(int64_t len, const T* out, bool stream, const Body& body) {
  using P = Pack<T>;
  int64_t i = 0;
  if (P::kCanStream && stream) {
    const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(out) % P::kAlign) / sizeof(T);
    const int64_t head = mis == 0 ? 0 : std::min(len, P::kSize - mis);
    if (head > 0) body(int64_t(0), head, std::false_type{});
    for (i = head; i + P::kSize <= len; i += P::kSize) body(i, P::kSize, std::true_type{});
  } else {
    for (; i + P::kSize <= len; i += P::kSize) body(i, P::kSize, std::false_type{});
  }
  if (i < len) body(i, len - i, std::false_type{});
}

// Sum of the lanes of one opmath vector. at::vec reduces float vectors with in-register
// shuffles; its generic path (used for double) goes through memory element by element,
// which costs more than the short dot products of small rows, so double lanes are summed
// from one store instead.
template <typename VA>
inline double hsum(const VA& v) {
  using A = typename VA::value_type;
  if constexpr (std::is_same_v<A, float>) {
    return static_cast<double>(at::vec::vec_reduce_all<float>(std::plus<VA>(), v));
  } else {
    __at_align__ A lanes[VA::size()];
    v.store(lanes);
    double s = 0.0;
    for (int64_t i = 0; i < VA::size(); ++i) s += lanes[i];
    return s;
  }
}

// <a, b> over n elements (n <= kBlock), accumulated in opmath vectors.
template <typename T>
inline double dot_block(const T* a, const T* b, int64_t n) {
  using P = Pack<T>;
  auto acc = P::broadcast(0);
  int64_t i = 0;
  for (; i + P::kSize <= n; i += P::kSize) {
    const auto av = P::load(a + i), bv = P::load(b + i);
    for (int j = 0; j < P::kParts; ++j) acc.p[j] = at::vec::fmadd(av.p[j], bv.p[j], acc.p[j]);
  }
  if (i < n) {  // lanes past n load as zero
    const auto av = P::load(a + i, n - i), bv = P::load(b + i, n - i);
    for (int j = 0; j < P::kParts; ++j) acc.p[j] = at::vec::fmadd(av.p[j], bv.p[j], acc.p[j]);
  }
  for (int j = 1; j < P::kParts; ++j) acc.p[0] = acc.p[0] + acc.p[j];
  return hsum(acc.p[0]);
}

// Calls f(b, n0, n1) for every row segment of the flattened range [begin, end).
template <typename F>
inline void for_each_row_segment(int64_t begin, int64_t end, int64_t N, const F& f) {
  int64_t b = begin / N;
  int64_t n0 = begin - b * N;
  for (int64_t pos = begin; pos < end; ++b, n0 = 0) {
    const int64_t n1 = std::min(N, n0 + (end - pos));
    f(b, n0, n1);
    pos += n1 - n0;
  }
}

// The elementwise ops: f(b, n0, n1) for every row segment of [0, B*N), in parallel.
template <typename F>
void parallel_segments(int64_t B, int64_t N, const F& f) {
  at::parallel_for(0, B * N, kGrain, [&](int64_t begin, int64_t end) {
    for_each_row_segment(begin, end, N, f);
    stream_fence();
  });
}

// out[b, k] = sum over the row of the partials that seg(b, n0, n1, part[K]) adds into
// part (which starts at zero). Rows that fit in one chunk are written directly; a row
// cut by chunk boundaries leaves its pieces in per-chunk slots that are combined in
// double and in chunk order afterwards.
template <typename A, typename Seg>
void reduce_rows(int64_t B, int64_t N, int64_t K, A* out, const Seg& seg) {
  const int64_t total = B * N;
  if (total == 0) {
    std::fill(out, out + B * K, A(0));
    return;
  }
  const int64_t nchunks = (total + kReduceChunk - 1) / kReduceChunk;
  // A chunk holds at most two partial rows: the one it starts in and the one it ends in.
  std::vector<int64_t> slot_row(2 * nchunks, -1);
  std::vector<double> slot_sum(2 * nchunks * K, 0.0);

  const int64_t grain = std::max<int64_t>(1, kGrain / kReduceChunk);
  at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
    std::vector<double> part(K);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kReduceChunk;
      const int64_t end = std::min(total, begin + kReduceChunk);
      int slot = 0;
      for_each_row_segment(begin, end, N, [&](int64_t b, int64_t n0, int64_t n1) {
        std::fill(part.begin(), part.end(), 0.0);
        seg(b, n0, n1, part.data());
        if (n0 == 0 && n1 == N) {
          for (int64_t k = 0; k < K; ++k) out[b * K + k] = static_cast<A>(part[k]);
        } else {
          const int64_t s = 2 * c + slot++;
          slot_row[s] = b;
          std::copy(part.begin(), part.end(), slot_sum.begin() + s * K);
        }
      });
    }
    stream_fence();
  });

  // Pieces of one row sit in consecutive slots, so one ordered scan combines them.
  std::vector<double> acc(K, 0.0);
  int64_t row = -1;
  auto flush = [&] {
    if (row < 0) return;
    for (int64_t k = 0; k < K; ++k) out[row * K + k] = static_cast<A>(acc[k]);
    std::fill(acc.begin(), acc.end(), 0.0);
  };
  for (int64_t s = 0; s < 2 * nchunks; ++s) {
    if (slot_row[s] < 0) continue;
    if (slot_row[s] != row) {
      flush();
      row = slot_row[s];
    }
    for (int64_t k = 0; k < K; ++k) acc[k] += slot_sum[s * K + k];
  }
  flush();
}

// One row segment [off, off + len) of a backward op, block by block (see kBlock):
// elem(i, n, tag) writes the elementwise outputs of each pack (aligned as `out`), then
// part[k] += dot(k, i, n) over the block, whose second read hits L1.
template <typename T, typename Elem, typename Dot>
inline void backward_sweep(int64_t off, int64_t len, const T* out, bool stream, int64_t nk,
                           double* part, const Elem& elem, const Dot& dot) {
  for (int64_t blk = off; blk < off + len; blk += kBlock) {
    const int64_t n = std::min(off + len - blk, kBlock);
    for_each_pack(n, out + blk, stream,
                  [&](int64_t i, int64_t m, auto tag) { elem(blk + i, m, tag); });
    for (int64_t k = 0; k < nk; ++k) part[k] += dot(k, blk, n);
  }
}

// Compile-time K (KS > 0) lets the compiler unroll the branch loop and keep the
// coefficients and accumulators in registers; KS == 0 is the general path for any K.
// The dispatch covers the K an EPD solver uses in practice.
template <typename F>
inline void dispatch_k(int64_t K, const F& f) {
  switch (K) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// Row b's coefficients and factor: weights (or c) [K] (row stride 0) or [B, K]; the factor
// is alpha * scale[b] with scale [] (stride 0), [B], or undefined (1).
template <typename A>
struct Coefs {
  const A* w;
  int64_t wstride;
  const A* s;
  int64_t sstride;
  double alpha;

  Coefs(const at::Tensor& weights, const at::Tensor& scale, double alpha_)
      : w(weights.const_data_ptr<A>()),
        wstride(weights.dim() == 2 ? weights.size(1) : 0),
        s(scale.defined() ? scale.const_data_ptr<A>() : nullptr),
        sstride(scale.defined() && scale.dim() == 1 ? 1 : 0),
        alpha(alpha_) {}

  inline const A* row(int64_t b) const { return w + b * wstride; }
  inline A factor(int64_t b) const {
    return s == nullptr ? static_cast<A>(alpha) : static_cast<A>(alpha * s[b * sstride]);
  }
};

// Row b's coefficients factor * w[k] as vectors. For a compile-time K they are hoisted
// into registers once per segment; for a run-time K they are broadcast on use (a
// broadcast is far cheaper than the loads it feeds).
template <typename T, int KS>
struct RowCoef {
  using A = at::opmath_type<T>;
  using VA = Vectorized<A>;
  const A* w;
  A scale;
  VA v[KS > 0 ? KS : 1];

  RowCoef(const Coefs<A>& coefs, int64_t b) : w(coefs.row(b)), scale(coefs.factor(b)) {
    if constexpr (KS > 0) {
      for (int k = 0; k < KS; ++k) v[k] = VA(scale * w[k]);
    }
  }
  inline VA operator[](int64_t k) const {
    if constexpr (KS > 0) {
      return v[k];
    } else {
      return VA(scale * w[k]);
    }
  }
};

// epd_step forward: y = x + sum_k coef_k * g_k (branch k of grads is kstride further).
template <typename T, int KS>
void step_fwd_typed(const at::Tensor& x, const at::Tensor& grads, const at::Tensor& weights,
                    const at::Tensor& scale, double alpha, const at::Tensor& y) {
  using P = Pack<T>;
  const int64_t B = x.size(0), N = x.size(1), kstride = B * N;
  const int64_t nk = KS > 0 ? KS : grads.size(0);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grads.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const Coefs<at::opmath_type<T>> coefs(weights, scale, alpha);
  const bool stream = use_streaming<T>(B * N * int64_t(sizeof(T)), 0, yp);
  parallel_segments(B, N, [&](int64_t b, int64_t n0, int64_t n1) {
    const RowCoef<T, KS> coef(coefs, b);
    const int64_t off = b * N + n0;
    for_each_pack(n1 - n0, yp + off, stream, [&](int64_t i, int64_t n, auto tag) {
      i += off;
      auto acc = P::load(xp + i, n);
      for (int64_t k = 0; k < nk; ++k) {
        const auto gv = P::load(gp + k * kstride + i, n);
        const auto ck = coef[k];
        for (int j = 0; j < P::kParts; ++j) acc.p[j] = at::vec::fmadd(ck, gv.p[j], acc.p[j]);
      }
      P::put(yp + i, acc, n, tag);
    });
  });
}

// epd_step backward: gg_k = coef_k * go and dots[b, k] = <go_b, g_kb>.
template <typename T, int KS>
void step_bwd_typed(const at::Tensor& grad_out, const at::Tensor& grads,
                    const at::Tensor& weights, const at::Tensor& scale, double alpha,
                    const at::Tensor& grad_grads, const at::Tensor& dots) {
  using P = Pack<T>;
  using A = at::opmath_type<T>;
  const int64_t B = grad_out.size(0), N = grad_out.size(1), K = grads.size(0);
  const int64_t kstride = B * N, nk = KS > 0 ? KS : K;
  const T* gop = grad_out.const_data_ptr<T>();
  const T* gp = grads.const_data_ptr<T>();
  T* ggp = grad_grads.mutable_data_ptr<T>();
  const Coefs<A> coefs(weights, scale, alpha);
  const bool stream = use_streaming<T>(K * B * N * int64_t(sizeof(T)), kstride, ggp);
  reduce_rows<A>(B, N, K, dots.mutable_data_ptr<A>(),
                 [&](int64_t b, int64_t n0, int64_t n1, double* part) {
    const RowCoef<T, KS> coef(coefs, b);
    const auto elem = [&](int64_t i, int64_t n, auto tag) {
      const auto gov = P::load(gop + i, n);
      for (int64_t k = 0; k < nk; ++k) {
        const auto ck = coef[k];
        typename P::V out;
        for (int j = 0; j < P::kParts; ++j) out.p[j] = ck * gov.p[j];
        P::put(ggp + k * kstride + i, out, n, tag);
      }
    };
    const auto dot = [&](int64_t k, int64_t i, int64_t n) {
      return dot_block(gop + i, gp + k * kstride + i, n);
    };
    backward_sweep(b * N + n0, n1 - n0, ggp, stream, nk, part, elem, dot);
  });
}

// branch_states: out_k = x + c_k * d.
template <typename T, int KS>
void branch_fwd_typed(const at::Tensor& x, const at::Tensor& d, const at::Tensor& c,
                      const at::Tensor& out) {
  using P = Pack<T>;
  const int64_t B = x.size(0), N = x.size(1), K = c.size(-1);
  const int64_t kstride = B * N, nk = KS > 0 ? KS : K;
  const T* xp = x.const_data_ptr<T>();
  const T* dp = d.const_data_ptr<T>();
  T* outp = out.mutable_data_ptr<T>();
  const Coefs<at::opmath_type<T>> coefs(c, at::Tensor(), 1.0);
  const bool stream = use_streaming<T>(K * B * N * int64_t(sizeof(T)), kstride, outp);
  parallel_segments(B, N, [&](int64_t b, int64_t n0, int64_t n1) {
    const RowCoef<T, KS> coef(coefs, b);
    const int64_t off = b * N + n0;
    for_each_pack(n1 - n0, outp + off, stream, [&](int64_t i, int64_t n, auto tag) {
      i += off;
      const auto xv = P::load(xp + i, n);
      const auto dv = P::load(dp + i, n);
      for (int64_t k = 0; k < nk; ++k) {
        const auto ck = coef[k];
        typename P::V r;
        for (int j = 0; j < P::kParts; ++j) r.p[j] = at::vec::fmadd(ck, dv.p[j], xv.p[j]);
        P::put(outp + k * kstride + i, r, n, tag);
      }
    });
  });
}

// branch_states backward: gx = sum_k go_k, gd = sum_k c_k * go_k, grad_c[b, k] = <go_kb, d_b>.
template <typename T, int KS>
void branch_bwd_typed(const at::Tensor& grad_out, const at::Tensor& d, const at::Tensor& c,
                      const at::Tensor& grad_x, const at::Tensor& grad_d,
                      const at::Tensor& grad_c) {
  using P = Pack<T>;
  using A = at::opmath_type<T>;
  const int64_t B = d.size(0), N = d.size(1), K = c.size(-1);
  const int64_t kstride = B * N, nk = KS > 0 ? KS : K;
  const T* gop = grad_out.const_data_ptr<T>();
  const T* dp = d.const_data_ptr<T>();
  T* gxp = grad_x.mutable_data_ptr<T>();
  T* gdp = grad_d.mutable_data_ptr<T>();
  const Coefs<A> coefs(c, at::Tensor(), 1.0);
  const bool stream = use_streaming<T>(2 * B * N * int64_t(sizeof(T)), 0, gxp, gdp);
  reduce_rows<A>(B, N, K, grad_c.mutable_data_ptr<A>(),
                 [&](int64_t b, int64_t n0, int64_t n1, double* part) {
    const RowCoef<T, KS> coef(coefs, b);
    const auto elem = [&](int64_t i, int64_t n, auto tag) {
      auto sx = P::broadcast(0), sd = P::broadcast(0);
      for (int64_t k = 0; k < nk; ++k) {
        const auto gk = P::load(gop + k * kstride + i, n);
        const auto ck = coef[k];
        for (int j = 0; j < P::kParts; ++j) {
          sx.p[j] = sx.p[j] + gk.p[j];
          sd.p[j] = at::vec::fmadd(ck, gk.p[j], sd.p[j]);
        }
      }
      P::put(gxp + i, sx, n, tag);
      P::put(gdp + i, sd, n, tag);
    };
    const auto dot = [&](int64_t k, int64_t i, int64_t n) {
      return dot_block(gop + k * kstride + i, dp + i, n);
    };
    backward_sweep(b * N + n0, n1 - n0, gxp, stream, nk, part, elem, dot);
  });
}

}  // namespace

// Entry points declared in cpu_kernels.h: dtype and K dispatch only.
#define EPD_KERNELS_DISPATCH(dtype_of, K, typed, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (dtype_of).scalar_type(),      \
                                  #typed, [&] {                                            \
    dispatch_k(K, [&](auto ks) { typed<scalar_t, decltype(ks)::value>(__VA_ARGS__); });     \
  })

void epd_step_fwd(const at::Tensor& x, const at::Tensor& grads, const at::Tensor& weights,
                  const at::Tensor& scale, double alpha, const at::Tensor& y) {
  EPD_KERNELS_DISPATCH(x, grads.size(0), step_fwd_typed, x, grads, weights, scale, alpha, y);
}

void epd_step_bwd(const at::Tensor& grad_out, const at::Tensor& grads,
                  const at::Tensor& weights, const at::Tensor& scale, double alpha,
                  const at::Tensor& grad_grads, const at::Tensor& dots) {
  EPD_KERNELS_DISPATCH(grads, grads.size(0), step_bwd_typed, grad_out, grads, weights, scale,
                       alpha, grad_grads, dots);
}

void branch_states(const at::Tensor& x, const at::Tensor& d, const at::Tensor& c,
                   const at::Tensor& out) {
  EPD_KERNELS_DISPATCH(x, c.size(-1), branch_fwd_typed, x, d, c, out);
}

void branch_states_bwd(const at::Tensor& grad_out, const at::Tensor& d, const at::Tensor& c,
                       const at::Tensor& grad_x, const at::Tensor& grad_d,
                       const at::Tensor& grad_c) {
  EPD_KERNELS_DISPATCH(d, c.size(-1), branch_bwd_typed, grad_out, d, c, grad_x, grad_d, grad_c);
}

#undef EPD_KERNELS_DISPATCH

}  // namespace epd_kernels::cpu::CPU_CAPABILITY
