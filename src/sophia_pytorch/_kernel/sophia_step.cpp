// One pass of the Sophia step per tensor: read θ, g, m, h once, write θ and m once.
//
// The arithmetic repeats, operation for operation and rounding for rounding, what
// sophia_pytorch.functional._single_tensor_sophia asks of torch's CPU kernels, so the result is
// bitwise the same:
//   θ ← θ·decay                              (param.mul_, rounded to θ's dtype)
//   m ← fma(g, 1−β1, m·β1)                   (mul_ then add_(alpha=): torch fuses the alpha)
//   r ← clamp(m / max(ρ·h, ε), −1, 1)        (NaN passes through, as in torch's clamp)
//   θ ← fma(r, −lr, θ)                       (add_(alpha=−lr)); for bf16/fp16 θ with float32
//                                            state: θ + round(r·(−lr)), as the .to() there does
// Scalars arrive as doubles and are rounded to the state dtype, as torch rounds a Python
// scalar to a kernel's compute type. Built with -ffp-contract=off so the compiler adds no
// fusions of its own.
//
// bfloat16 state (m and h stored as bf16, the optimizers' state_dtype): m and h are widened to
// float32, the step is the float32 one, and the new m is stored with stochastic rounding whose
// random bits are the top half of (element index ^ key)·0x21f0aaad mod 2^32, exactly as
// sophia_pytorch._rounding does it with torch's integer ops: the same bits on every path.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct Coefficients {
  double decay;            // 1 − lr·weight_decay
  double beta1;
  double one_minus_beta1;  // 1 − β1
  double rho;
  double eps;
  double neg_lr;           // −lr
  bool maximize;
};

// max(x, floor) and min(x, ceiling) the way torch's clamp does them: a NaN x passes through.
template <typename T>
inline T floor_at(T x, T floor) { return floor > x ? floor : x; }
template <typename T>
inline T ceil_at(T x, T ceiling) { return ceiling < x ? ceiling : x; }

// A bfloat16 state element, as its raw bits (kept apart from c10::BFloat16 so that the loops
// stay plain integer and float arithmetic the compiler can vectorise).
struct Bf16 {
  uint16_t bits;
};

// State element <-> float: float state as it is, bf16 widened exactly / stored with stochastic
// rounding (add 16 random bits below bf16's mantissa, keep the top half; NaN -> 0x7FC0).
inline float widen(float x) { return x; }
inline float widen(Bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
// index: the element's offset in the tensor, modulo 2^32.
template <typename S>
inline S narrow(float x, uint32_t, uint32_t) { return x; }
template <>
inline Bf16 narrow<Bf16>(float x, uint32_t key, uint32_t index) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t noise = ((index ^ key) * 0x21f0aaadu) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return Bf16{static_cast<uint16_t>(nan ? 0x7FC0u : (bits + noise) >> 16)};
}

// θ and g share one dtype T (float or double), as do m and h, and the arithmetic is done in T.
// Maximize negates g (a sign-bit flip, as torch's neg does, so even a NaN gradient keeps its
// bits).
template <typename T, bool Maximize>
void step_same_dtype(T* __restrict param, const T* __restrict grad, T* __restrict exp_avg,
                     const T* __restrict hessian, int64_t begin, int64_t end,
                     const Coefficients& c) {
  const T decay = static_cast<T>(c.decay), beta1 = static_cast<T>(c.beta1);
  const T one_minus_beta1 = static_cast<T>(c.one_minus_beta1), rho = static_cast<T>(c.rho);
  const T eps = static_cast<T>(c.eps), neg_lr = static_cast<T>(c.neg_lr);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T theta = param[i] * decay;
    const T m = std::fma(Maximize ? -grad[i] : grad[i], one_minus_beta1, exp_avg[i] * beta1);
    exp_avg[i] = m;
    const T ratio = ceil_at(floor_at(m / floor_at(rho * hessian[i], eps), T(-1)), T(1));
    param[i] = std::fma(ratio, neg_lr, theta);
  }
}

// float32 θ and g, bf16 m and h: the float32 step on the widened state, m stored
// stochastically rounded. The loop counts in 32 bits (the hash's index is 32-bit) from
// pointers moved to ``begin``, so the vectorised loop carries no 64-bit index vectors.
template <bool Maximize>
void step_float_bf16_state(float* __restrict param, const float* __restrict grad,
                           Bf16* __restrict exp_avg, const Bf16* __restrict hessian,
                           int64_t begin, int64_t end, const Coefficients& c, uint32_t key) {
  const float decay = static_cast<float>(c.decay), beta1 = static_cast<float>(c.beta1);
  const float one_minus_beta1 = static_cast<float>(c.one_minus_beta1);
  const float rho = static_cast<float>(c.rho), eps = static_cast<float>(c.eps);
  const float neg_lr = static_cast<float>(c.neg_lr);
  param += begin;
  grad += begin;
  exp_avg += begin;
  hessian += begin;
  const uint32_t first = static_cast<uint32_t>(begin);
  const uint32_t count = static_cast<uint32_t>(end - begin);  // a chunk: < 2^32
#pragma omp simd
  for (uint32_t j = 0; j < count; ++j) {
    const float theta = param[j] * decay;
    const float m = std::fma(Maximize ? -grad[j] : grad[j], one_minus_beta1,
                             widen(exp_avg[j]) * beta1);
    exp_avg[j] = narrow<Bf16>(m, key, first + j);
    const float ratio =
        ceil_at(floor_at(m / floor_at(rho * widen(hessian[j]), eps), -1.0f), 1.0f);
    param[j] = std::fma(ratio, neg_lr, theta);
  }
}

// θ and g in a 16-bit type P, arithmetic in float32, state S float32 or bf16.
template <typename P, typename S, bool Maximize>
void step_low_precision(P* __restrict param, const P* __restrict grad,
                        S* __restrict exp_avg, const S* __restrict hessian,
                        int64_t begin, int64_t end, const Coefficients& c, uint32_t key) {
  const float decay = static_cast<float>(c.decay), beta1 = static_cast<float>(c.beta1);
  const float one_minus_beta1 = static_cast<float>(c.one_minus_beta1);
  const float rho = static_cast<float>(c.rho), eps = static_cast<float>(c.eps);
  const float neg_lr = static_cast<float>(c.neg_lr);
  for (int64_t i = begin; i < end; ++i) {
    const float theta = static_cast<float>(P(static_cast<float>(param[i]) * decay));
    const float g = static_cast<float>(grad[i]);
    const float m = std::fma(Maximize ? -g : g, one_minus_beta1, widen(exp_avg[i]) * beta1);
    exp_avg[i] = narrow<S>(m, key, static_cast<uint32_t>(i));
    const float ratio =
        ceil_at(floor_at(m / floor_at(rho * widen(hessian[i]), eps), -1.0f), 1.0f);
    const float step = static_cast<float>(P(ratio * neg_lr));
    param[i] = P(theta + step);
  }
}

// The real dtype a tensor's storage is read as, and how many of them per element.
std::pair<at::ScalarType, int64_t> real_view(at::ScalarType dtype) {
  switch (dtype) {
    case at::kComplexFloat: return {at::kFloat, 2};
    case at::kComplexDouble: return {at::kDouble, 2};
    default: return {dtype, 1};
  }
}

// The kernel handles a tensor when all four are dense CPU tensors laid out alike, with
// dtypes (θ, g, m, h) of (T, T, T, T) for T float/double (or their complex), or
// (P, P, float, float) for P bfloat16/float16. Anything else is left to the caller.
bool supported(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
               const at::Tensor& hessian) {
  for (const at::Tensor* t : {&param, &grad, &exp_avg, &hessian}) {
    if (!t->defined() || t->device().type() != c10::DeviceType::CPU || t->is_sparse() ||
        t->layout() != c10::kStrided || !t->is_non_overlapping_and_dense() || t->is_neg() ||
        t->is_conj()) {
      return false;
    }
  }
  if (grad.sizes() != param.sizes() || exp_avg.sizes() != param.sizes() ||
      hessian.sizes() != param.sizes() || grad.strides() != param.strides() ||
      exp_avg.strides() != param.strides() || hessian.strides() != param.strides()) {
    return false;
  }
  const auto dtype = param.scalar_type(), state = exp_avg.scalar_type();
  if (grad.scalar_type() != dtype || hessian.scalar_type() != state) return false;
  switch (dtype) {
    case at::kFloat:
      return state == dtype || state == at::kBFloat16;
    case at::kDouble: case at::kComplexFloat: case at::kComplexDouble:
      return state == dtype;
    case at::kBFloat16: case at::kHalf:
      return state == at::kFloat || state == at::kBFloat16;
    default:
      return false;
  }
}

// A stretch [begin, end) of one tensor's elements, and the loop that updates it.
struct Chunk {
  void (*update)(void*, const void*, void*, const void*, int64_t, int64_t, const Coefficients&,
                 uint32_t);
  void* param;
  const void* grad;
  void* exp_avg;
  const void* hessian;
  int64_t begin, end;
  uint32_t key;  // the stochastic-rounding key of a bf16 state (unused for float state)
};

template <typename P, typename S, bool Maximize>
void update_chunk(void* param, const void* grad, void* exp_avg, const void* hessian,
                  int64_t begin, int64_t end, const Coefficients& c, uint32_t key) {
  if constexpr (std::is_same_v<P, S>) {
    step_same_dtype<P, Maximize>(static_cast<P*>(param), static_cast<const P*>(grad),
                                 static_cast<S*>(exp_avg), static_cast<const S*>(hessian),
                                 begin, end, c);
  } else if constexpr (std::is_same_v<P, float>) {
    step_float_bf16_state<Maximize>(static_cast<float*>(param), static_cast<const float*>(grad),
                                    static_cast<Bf16*>(exp_avg),
                                    static_cast<const Bf16*>(hessian), begin, end, c, key);
  } else {
    step_low_precision<P, S, Maximize>(static_cast<P*>(param), static_cast<const P*>(grad),
                                       static_cast<S*>(exp_avg), static_cast<const S*>(hessian),
                                       begin, end, c, key);
  }
}

template <typename P, typename S>
decltype(Chunk::update) chunk_loop(bool maximize) {
  return maximize ? &update_chunk<P, S, true> : &update_chunk<P, S, false>;
}

// Elements per chunk: the unit in which the step's elements are dealt out to threads.
constexpr int64_t kChunk = 32768;
// Below this many elements in all, the step runs on the calling thread: waking the other
// threads costs more than it saves (and, on a loaded machine, up to a scheduler time slice).
constexpr int64_t kSerialBelow = 4 * kChunk;

// Updates every index i whose tensors the kernel supports; returns the indices it skipped.
// All tensors are cut into chunks that the threads share in a single parallel region, so a
// step synchronises its threads once rather than once per tensor.
std::vector<int64_t> step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList hessians, double decay, double beta1,
                          double one_minus_beta1, double rho, double eps, double neg_lr,
                          bool maximize, at::IntArrayRef keys) {
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  hessians.size() == params.size(),
              "sophia fused step: the four tensor lists must have the same length");
  TORCH_CHECK(keys.empty() || keys.size() == params.size(),
              "sophia fused step: give one rounding key per tensor, or none");
  const Coefficients c{decay, beta1, one_minus_beta1, rho, eps, neg_lr, maximize};
  std::vector<int64_t> skipped;
  std::vector<size_t> updated;
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!supported(params[i], grads[i], exp_avgs[i], hessians[i])) {
      skipped.push_back(static_cast<int64_t>(i));
      continue;
    }
    const auto [dtype, per_element] = real_view(params[i].scalar_type());
    const int64_t n = params[i].numel() * per_element;
    updated.push_back(i);
    decltype(Chunk::update) loop = nullptr;
    const bool bf16 = exp_avgs[i].scalar_type() == at::kBFloat16;
    switch (dtype) {
      case at::kFloat:
        loop = bf16 ? chunk_loop<float, Bf16>(maximize) : chunk_loop<float, float>(maximize);
        break;
      case at::kDouble: loop = chunk_loop<double, double>(maximize); break;
      case at::kBFloat16:
        loop = bf16 ? chunk_loop<c10::BFloat16, Bf16>(maximize)
                    : chunk_loop<c10::BFloat16, float>(maximize);
        break;
      case at::kHalf:
        loop = bf16 ? chunk_loop<c10::Half, Bf16>(maximize)
                    : chunk_loop<c10::Half, float>(maximize);
        break;
      default: TORCH_CHECK(false, "sophia fused step: unsupported dtype ", dtype);
    }
    TORCH_CHECK(!bf16 || !keys.empty(),
                "sophia fused step: bfloat16 state needs one rounding key per tensor");
    const auto key = keys.empty() ? 0u : static_cast<uint32_t>(keys[i] & 0xFFFFFFFF);
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      chunks.push_back(Chunk{loop, params[i].data_ptr(), grads[i].const_data_ptr(),
                             exp_avgs[i].data_ptr(), hessians[i].const_data_ptr(), begin,
                             std::min(begin + kChunk, n), key});
    }
    total += n;
  }
  const auto run = [&](size_t first, size_t last) {
    for (size_t k = first; k < last; ++k) {
      const Chunk& chunk = chunks[k];
      chunk.update(chunk.param, chunk.grad, chunk.exp_avg, chunk.hessian, chunk.begin,
                   chunk.end, c, chunk.key);
    }
  };
  const int64_t threads = total < kSerialBelow ? 1 : at::get_num_threads();
  if (threads <= 1) {
    run(0, chunks.size());
  } else {
    // Threads take chunks in order from a shared counter rather than a fixed share each: on
    // a shared machine a thread that loses its core leaves its work to the others instead
    // of making them wait for it at the end of the step.
    std::atomic<size_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (size_t k = next.fetch_add(1); k < chunks.size(); k = next.fetch_add(1)) {
        run(k, k + 1);
      }
    });
  }
  // Written through raw pointers: tell autograd the tensors changed, as an in-place op would.
  for (size_t i : updated) {
    params[i].unsafeGetTensorImpl()->bump_version();
    exp_avgs[i].unsafeGetTensorImpl()->bump_version();
  }
  return skipped;
}

}  // namespace

TORCH_LIBRARY(sophia_fused, m) {
  m.def(
      "step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] hessians, "
      "float decay, float beta1, float one_minus_beta1, float rho, float eps, float neg_lr, "
      "bool maximize, int[] keys=[]) -> int[]",
      &step);
}
