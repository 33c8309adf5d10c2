// The eager batch-norm step on aten's kernels, with batchnorm's guard, in one C++ call.
//
// Built on request by batchnorm._kernels.step_ext (``batchnorm build-ext``); the Python
// fallback that computes the same thing is batchnorm.ops.aten_step.aten_step_py. Both return
// (y, save_mean, save_invstd, code):
//
//   code OK (0)              y is the batch-normalized input; when `update`, the running
//                            statistics were updated by aten's rule (momentum, unbiased
//                            variance) and num_batches_tracked += 1
//   code ILL_CONDITIONED (1) some |mean| * invstd > kappa_max: aten's result is not precise
//                            enough; the running statistics are as before the call
//   code NOT_FINITE (2)      a batch statistic is not finite; the running statistics are as
//                            before the call, y is aten's (non-finite) output
//   code UNSUPPORTED (-1)    nothing was done: an input this step does not take (not a
//                            float32/float64 CPU tensor of 2+ dims, contiguous or channels-last;
//                            mixed dtypes; an empty batch; non-contiguous running statistics)
//
// momentum < 0 stands for None: the factor is 1 / (num_batches_tracked + 1). With running
// statistics but not `update` (a forward recomputed by activation checkpointing), aten updates
// scratch copies, so that its autograd node saves what the first forward's saved.
//
// The running statistics are restored with memcpy, not a tensor op: aten's autograd node holds
// them, and a tensor write would bump their version and fail its backward.

#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kOk = 0, kIllConditioned = 1, kNotFinite = 2, kUnsupported = -1;

bool float_cpu(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.device().is_cpu() && t.layout() == at::kStrided;
}

bool same(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  return !t.has_value() || !t->defined() || float_cpu(*t, dtype);
}

// The checks below are branch-free selects OR-ed together as bit patterns, a form GCC vectorizes
// (a bool or int reduction of comparisons it does not): `bits(x * 0.0 + y * 0.0)` is +-0 when x
// and y are finite and NaN otherwise, so the OR of those patterns has an all-ones exponent
// exactly when some value is not finite; a select of -0.0 sets the sign bit of its OR exactly
// when its comparison is true somewhere.
constexpr uint64_t kExponent = 0x7FF0000000000000ULL;

inline uint64_t bits(double value) {
  uint64_t out;
  std::memcpy(&out, &value, sizeof(out));
  return out;
}

inline int64_t code(uint64_t not_finite, uint64_t refused, uint64_t ill) {
  if ((not_finite & kExponent) == kExponent || (refused >> 63)) return kNotFinite;
  return (ill >> 63) ? kIllConditioned : kOk;
}

// The loops over the channels are compiled for AVX-512, AVX2 and the baseline, and the loader
// picks the widest the CPU has (function multiversioning, where the compiler and the platform
// offer it): about half the time per channel of the baseline build, two doubles per instruction.
#if defined(__x86_64__) && defined(__linux__) && (!defined(__clang__) || __clang_major__ >= 14)
#define WIDEST_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#define INLINED __attribute__((always_inline)) inline
#else
#define WIDEST_SIMD
#define INLINED inline
#endif

// NOT_FINITE when a statistic is not finite, else ILL_CONDITIONED when some
// |mean| * invstd > kappa_max, else OK.
template <typename T>
INLINED int64_t check(const T* mean, const T* invstd, int64_t c, double kappa_max) {
  uint64_t not_finite = 0, ill = 0;
  for (int64_t k = 0; k < c; ++k) {
    const double m = mean[k], inv = invstd[k];
    not_finite |= bits(m * 0.0 + inv * 0.0);
    ill |= bits(std::fabs(m) * std::fabs(inv) > kappa_max ? -0.0 : 0.0);
  }
  return code(not_finite, 0, ill);
}

// as `check`, for given statistics: invstd = 1 / sqrt(var + eps); var + eps <= 0 is not finite;
// |m| > kappa_max * sqrt(v) is tested as m^2 > kappa_max^2 * v (no root)
template <typename T>
INLINED int64_t check_fixed(const T* mean, const T* var, int64_t c, double eps, double kappa_max) {
  uint64_t not_finite = 0, refused = 0, ill = 0;
  const double k2 = kappa_max * kappa_max;
  for (int64_t k = 0; k < c; ++k) {
    const double m = mean[k], v = static_cast<double>(var[k]) + eps;
    not_finite |= bits(m * 0.0 + v * 0.0);
    refused |= bits(v > 0.0 ? 0.0 : -0.0);
    ill |= bits(m * m > k2 * v ? -0.0 : 0.0);
  }
  return code(not_finite, refused, ill);
}

template <typename T>
INLINED int64_t check_either(const T* mean, const T* second, int64_t c, bool fixed, double eps, double kappa_max) {
  return fixed ? check_fixed(mean, second, c, eps, kappa_max) : check(mean, second, c, kappa_max);
}

WIDEST_SIMD int64_t check_double(const double* mean, const double* second, int64_t c, bool fixed, double eps,
                                 double kappa_max) {
  return check_either(mean, second, c, fixed, eps, kappa_max);
}

WIDEST_SIMD int64_t check_float(const float* mean, const float* second, int64_t c, bool fixed, double eps,
                                double kappa_max) {
  return check_either(mean, second, c, fixed, eps, kappa_max);
}

int64_t check_tensors(const at::Tensor& mean, const at::Tensor& second, bool fixed, double eps, double kappa_max) {
  const at::Tensor m = mean.contiguous(), s = second.contiguous();
  if (m.scalar_type() == at::kDouble) {
    return check_double(m.data_ptr<double>(), s.data_ptr<double>(), m.numel(), fixed, eps, kappa_max);
  }
  return check_float(m.data_ptr<float>(), s.data_ptr<float>(), m.numel(), fixed, eps, kappa_max);
}

// the inputs aten's step takes here (as batchnorm._kernels.native.supports, for float32/float64
// CPU tensors): 2+ dims, not empty, no lazy negation, contiguous or channels-last
bool supported_input(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || !float_cpu(x, dtype) || x.dim() < 2 || x.numel() == 0 ||
      x.is_neg() || x.is_conj()) {
    return false;
  }
  return x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// num_batches_tracked read and incremented in place (a CPU int64 scalar); the increment bumps the
// tensor's version as add_ would
int64_t counter(const at::Tensor& n) {
  return n.scalar_type() == at::kLong && n.device().is_cpu() ? *n.data_ptr<int64_t>() : n.item<int64_t>();
}

void increment(const at::Tensor& n) {
  if (n.scalar_type() == at::kLong && n.device().is_cpu() && n.numel() == 1) {
    n.unsafeGetTensorImpl()->bump_version();  // first: it refuses an inference tensor outside inference mode
    *n.data_ptr<int64_t>() += 1;
  } else {
    n.add_(1);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> train_step(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, double momentum, double eps, double kappa_max, bool update) {
  const at::ScalarType dtype = x.scalar_type();
  const bool stats = running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                     running_var->defined();
  if (!supported_input(x) || !same(weight, dtype) || !same(bias, dtype) ||
      (stats && (!float_cpu(*running_mean, dtype) || !float_cpu(*running_var, dtype) ||
                 !running_mean->is_contiguous() || !running_var->is_contiguous())) ||
      (update && momentum < 0.0 && !(num_batches_tracked.has_value() && num_batches_tracked->defined()))) {
    return {at::Tensor(), at::Tensor(), at::Tensor(), kUnsupported};
  }
  pybind11::gil_scoped_release no_gil;
  at::Tensor y, save_mean, save_invstd;
  int64_t code;
  if (stats && update) {
    // the statistics before the call, kept in plain memory (a tensor copy costs a dispatch)
    thread_local std::vector<char> before;
    const size_t bytes = running_mean->nbytes();
    before.resize(2 * bytes);
    std::memcpy(before.data(), running_mean->data_ptr(), bytes);
    std::memcpy(before.data() + bytes, running_var->data_ptr(), bytes);
    const double factor = momentum >= 0.0 ? momentum : 1.0 / (static_cast<double>(counter(*num_batches_tracked)) + 1.0);
    std::tie(y, save_mean, save_invstd) =
        at::native_batch_norm(x, weight, bias, running_mean, running_var, true, factor, eps);
    code = check_tensors(save_mean, save_invstd, false, eps, kappa_max);
    if (code == kOk) {
      if (num_batches_tracked.has_value() && num_batches_tracked->defined()) increment(*num_batches_tracked);
    } else {
      std::memcpy(running_mean->data_ptr(), before.data(), bytes);
      std::memcpy(running_var->data_ptr(), before.data() + bytes, bytes);
    }
  } else if (stats) {  // scratch copies: the kernel saves the same tensors as in the first forward
    std::tie(y, save_mean, save_invstd) =
        at::native_batch_norm(x, weight, bias, running_mean->clone(), running_var->clone(), true, 0.0, eps);
    code = check_tensors(save_mean, save_invstd, false, eps, kappa_max);
  } else {
    std::tie(y, save_mean, save_invstd) =
        at::native_batch_norm(x, weight, bias, c10::nullopt, c10::nullopt, true, 0.0, eps);
    code = check_tensors(save_mean, save_invstd, false, eps, kappa_max);
  }
  return {y, save_mean, save_invstd, code};
}

// The eval forward y = weight * (x - mean) / sqrt(var + eps) + bias on aten's kernel, or None
// where it does not apply: other dtypes, statistics that need gradients (aten gives none), or
// statistics that are not finite or too ill-conditioned for aten's x * scale + shift.
c10::optional<at::Tensor> eval_step(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                    const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                    const at::Tensor& var, double eps, double kappa_max) {
  const at::ScalarType dtype = x.scalar_type();
  if (!supported_input(x) || !same(weight, dtype) ||
      !same(bias, dtype) || !float_cpu(mean, dtype) || !float_cpu(var, dtype) || mean.requires_grad() ||
      var.requires_grad()) {
    return c10::nullopt;
  }
  pybind11::gil_scoped_release no_gil;
  if (check_tensors(mean, var, true, eps, kappa_max) != kOk) return c10::nullopt;
  return at::batch_norm(x, weight, bias, mean, var, false, 0.0, eps, false);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train_step", &train_step, "aten's training step with batchnorm's guard");
  m.def("eval_step", &eval_step, "aten's eval forward where its precision suffices");
  m.attr("OK") = kOk;
  m.attr("ILL_CONDITIONED") = kIllConditioned;
  m.attr("NOT_FINITE") = kNotFinite;
  m.attr("UNSUPPORTED") = kUnsupported;
}
