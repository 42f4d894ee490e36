// Row kernels of the CalibRL CPU backend: per-row math on a (rows, V) logits chunk.
//
// Everything here works on one row (one token) at a time; cpu_ops.cpp parallelises over rows and
// binds the entry points. A row's loss depends on its logits z = logits / temperature only through
// lp = z_y - lse and H = lse - sum_j p_j z_j, so a row needs
//   (a) one streaming pass for max, lse, H, z_y (RowStats),
//   (b) the closed-form per-token loss terms and the coefficients a = -dL/dlp, b = -dL/dH
//       (row_terms, the C++ twin of calibrl_kernels/reference/coefficients.py::token_terms),
//   (c) the gradient dL/dlogits_j = [a (p_j - [j = y]) + b p_j (z_j - lse + H)] / temperature.
// Accumulation is in float for float / bfloat16 / half logits and in double for double logits.
//
// Portability: plain C++17, vectorised by the compiler (`omp simd` loops, a branch-free exp). On
// x86-64 Linux with GCC the hot loops are also compiled for x86-64-v3 (AVX2+FMA) and x86-64-v4
// (AVX-512) and picked at load time (target_clones), so no -march flag is needed and the same
// binary runs on any x86-64; other targets (aarch64, clang) use the compiler's baseline vectors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace calibrl {

// Columns of the token table and of the row table: calibrl_kernels/reference/coefficients.py TOKEN_FIELDS and
// ROW_FIELDS, in the same order (the Python loader checks them against layout()).
namespace token {
enum : int64_t {
  kOldLogp, kAdvantage, kBaseline, kSign, kGuideWeight, kExpert, kCLoss, kCGuide, kCEntropyMetric, kCAll, kCount
};
}  // namespace token
namespace row {
enum : int64_t {
  kLogp, kEntropy, kLse, kRowMax, kLogSum, kCoefA, kCoefB, kPg, kGuide, kEntropyLoss, kEntropyMetric, kClipfrac,
  kClipfracLower, kPpoKl, kCount
};
}  // namespace row

// Nothing may throw inside a CALIBRL_HOT function (nor in what it inlines): GCC's target clones cannot be
// unwound through, so an exception there calls std::terminate and aborts the interpreter, even inside
// at::parallel_for (which otherwise rethrows a work item's exception on the calling thread). Inputs are
// therefore checked before the parallel region (cpu_ops.cpp, check_target_values).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CALIBRL_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CALIBRL_HOT
#endif
#define CALIBRL_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------
// exp(x) for float without a libm call, so that loops over it vectorise: x = k ln2 + r, |r| <= ln2/2,
// e^r by the Cephes expf polynomial (about 1 ulp), 2^k from the exponent bits. Exact 0 below -87
// (true value < 1.7e-38, the smallest normal float) and for x = -inf.
//   x: the exponent (any float; NaN gives NaN)
CALIBRL_INLINE float exp_fast(float x) {
  const float lo = -87.0f, hi = 88.0f;
  const float xc = std::min(std::max(x, lo), hi);
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (round to nearest)
  const float k = (xc * 1.44269504088896341f + shift) - shift;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : p * scale;
}
CALIBRL_INLINE double exp_fast(double x) { return std::exp(x); }

template <typename acc_t>
CALIBRL_INLINE acc_t weighted(acc_t c, acc_t value) {  // c * value, exactly 0 where c == 0
  return c != acc_t(0) ? c * value : acc_t(0);
}

template <typename acc_t>
CALIBRL_INLINE acc_t tie_share_greater(acc_t x, acc_t other) {  // autograd's share of x in max(x, other)
  return x > other ? acc_t(1) : (x == other ? acc_t(0.5) : acc_t(0));
}

template <typename acc_t>
CALIBRL_INLINE acc_t tie_share_less(acc_t x, acc_t other) {  // autograd's share of x in min(x, other)
  return x < other ? acc_t(1) : (x == other ? acc_t(0.5) : acc_t(0));
}

template <typename acc_t>
CALIBRL_INLINE acc_t inside(acc_t x, acc_t low, acc_t high) {  // where clamp passes the gradient
  return (x >= low && x <= high) ? acc_t(1) : acc_t(0);
}

// ---------------------------------------------------------------------------------------------
// (a) row statistics: one pass over the row
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowStats {
  acc_t lse;      // log sum_j exp(z_j) = row_max / T + log_sum
  acc_t entropy;  // lse - sum_j p_j z_j
  acc_t row_max;  // max_j logits_j (raw, before the temperature)
  acc_t log_sum;  // log sum_j exp((logits_j - row_max) / T) >= 0
};

// The shifted scaled logit u = (x - row_max) / T <= 0, computed shift first. Every log-probability is formed
// from it (log p_j = u_j - log_sum), never as z_j - lse: with the compiler free to fuse x * (1/T) - lse into one
// FMA, the unrounded product minus a rounded lse misses by up to half an ulp of |z| (32 at |z| = 1e9), which
// exponentiates to e^32 (non-finite log-probs and gradients). (x - row_max) * (1/T) has no such pair: the
// max entry gives exactly 0. A -inf logit stays -inf (1/T is clamped to a positive normal float by the caller).
template <typename acc_t>
CALIBRL_INLINE acc_t shifted_logit(acc_t x, acc_t row_max, acc_t inv_temperature) {
  return (x - row_max) * inv_temperature;
}

// One pass in blocks of kStatBlock: the block's max (block stays in L1), then its exp-sums relative to
// the running max m (raw logits), rescaling the running sums when m grows; with u = (x - m) / T:
//   s = sum e^u,  t = sum e^u u,  log_sum = log s,  lse = m / T + log s,  H = log s - t / s.
constexpr int64_t kStatBlock = 512;

// A row of all -inf logits gives lse = -inf and entropy = NaN (as torch's log_softmax); a NaN or +inf logit
// gives NaN lse and entropy (and NaN gradients for the row, see row_gradient_body), as torch does.
template <typename scalar_t, typename acc_t>
CALIBRL_INLINE RowStats<acc_t> row_stats_body(const scalar_t* row,       // the row's V raw logits (unit stride)
                                              int64_t vocab,             // V
                                              acc_t inv_temperature) {   // 1 / temperature: z = logits / T
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = neg_inf, s = 0, t = 0;
  for (int64_t v0 = 0; v0 < vocab; v0 += kStatBlock) {
    const int64_t len = std::min(kStatBlock, vocab - v0);
    const scalar_t* block = row + v0;
    acc_t block_max = neg_inf;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < len; ++j) {
      block_max = std::max(block_max, static_cast<acc_t>(block[j]));
    }
    if (block_max == neg_inf) continue;  // an all -inf block adds nothing
    if (block_max > m) {
      if (m != neg_inf) {
        const acc_t shift = shifted_logit(m, block_max, inv_temperature), f = exp_fast(shift);
        t = f * (t + s * shift);
        s = f * s;
      }
      m = block_max;
    }
    acc_t bs = 0, bt = 0;
#pragma omp simd reduction(+ : bs, bt)
    for (int64_t j = 0; j < len; ++j) {
      const acc_t u = shifted_logit(static_cast<acc_t>(block[j]), m, inv_temperature);
      const acc_t e = exp_fast(u);
      bs += e;
      bt += e > acc_t(0) ? e * u : acc_t(0);  // e = 0 for u = -inf: no 0 * inf
    }
    s += bs;
    t += bt;
  }
  const acc_t log_s = std::log(s);
  // H >= 0 exactly; rounding in log s - t / s can give -1e-8 when one logit dominates (T = 1e-4). std::max
  // keeps a NaN first argument, so a NaN row still reports NaN.
  return {m * inv_temperature + log_s, std::max(log_s - t / s, acc_t(0)), m, log_s};
}

// ---------------------------------------------------------------------------------------------
// (b) per-token loss terms and gradient coefficients (mirrors reference/coefficients.py token_terms)
// ---------------------------------------------------------------------------------------------
enum class Mode { kCalibrl, kGrpo, kDapo, kDrgrpo, kLuffy, kRlplus };
enum class Activation { kLeakyRelu, kRelu, kTanh, kSigmoid, kHuber, kNone };

struct LossParams {
  Mode mode;
  Activation activation;
  bool uses_guide;         // calibrl with an activation other than none
  bool keeps_expert_rows;  // luffy / rlplus: expert tokens get the expert term
  double clip_low, clip_high, dual_clip_c, guide_coef, negative_slope, huber_delta, entropy_coef;
  double log_ratio_clamp;   // LOG_RATIO_CLAMP
  double luffy_gamma;       // LUFFY_SHAPING_GAMMA
  double rlplus_old_weight, rlplus_mix, rlplus_focal_power;
};

// act(z) and act'(z) with torch's values at the kinks (leaky_relu: slope at 0, relu: 0 at 0).
template <typename acc_t>
CALIBRL_INLINE void guide_activation(acc_t z,              // the guide's argument -s (lp - b)
                                     const LossParams& P,  // P.activation, P.negative_slope, P.huber_delta
                                     acc_t* value,         // out: act(z)
                                     acc_t* slope) {       // out: act'(z)
  switch (P.activation) {
    case Activation::kLeakyRelu: {
      const acc_t alpha = static_cast<acc_t>(P.negative_slope);
      *value = z > 0 ? z : z * alpha;
      *slope = z > 0 ? acc_t(1) : alpha;
      return;
    }
    case Activation::kRelu:
      *value = z > 0 ? z : acc_t(0);
      *slope = z > 0 ? acc_t(1) : acc_t(0);
      return;
    case Activation::kTanh: {
      const acc_t y = std::tanh(z);
      *value = y;
      *slope = acc_t(1) - y * y;
      return;
    }
    case Activation::kSigmoid: {
      const acc_t y = acc_t(1) / (acc_t(1) + std::exp(-z));
      *value = y;
      *slope = (acc_t(1) - y) * y;
      return;
    }
    case Activation::kHuber: {
      const acc_t delta = static_cast<acc_t>(P.huber_delta), size = std::abs(z);
      *value = size < delta ? acc_t(0.5) * z * z : delta * (size - acc_t(0.5) * delta);
      *slope = std::min(std::max(z, -delta), delta);
      return;
    }
    case Activation::kNone:
      *value = 0;
      *slope = 0;
      return;
  }
}

// Fills out[row::kCoefA .. row::kPpoKl] of one token from lp, H and its token-table row.
template <typename acc_t>
CALIBRL_INLINE void row_terms(acc_t lp,             // log p(y) of the token under the current policy
                              acc_t entropy,        // H of its row
                              const acc_t* tok,     // its token-table row (token::kCount inputs)
                              const LossParams& P,  // loss mode, activation and constants
                              acc_t* out) {         // its row-table row (row::kCount), terms filled in
  const acc_t old_lp = tok[token::kOldLogp], adv = tok[token::kAdvantage];
  const acc_t c_loss = tok[token::kCLoss], c_guide = tok[token::kCGuide], c_all = tok[token::kCAll];
  // PPO dual clip: rho = exp(clamp(lp - old, +-20)), l1 = -A rho, l2 = -A clamp(rho, lo, hi), lc = max,
  // l_pg = min(lc, -c A) for A < 0.
  const acc_t bound = static_cast<acc_t>(P.log_ratio_clamp);
  const acc_t log_ratio = lp - old_lp;
  const acc_t ratio = std::exp(std::min(std::max(log_ratio, -bound), bound));
  const acc_t d_ratio = ratio * inside(log_ratio, -bound, bound);
  const acc_t low = acc_t(1) - static_cast<acc_t>(P.clip_low), high = acc_t(1) + static_cast<acc_t>(P.clip_high);
  const acc_t l1 = -adv * ratio;
  const acc_t l2 = -adv * std::min(std::max(ratio, low), high);
  const acc_t lc = std::max(l1, l2);
  const acc_t l3 = -static_cast<acc_t>(P.dual_clip_c) * adv;
  const bool negative = adv < 0;
  acc_t l_pg = negative ? std::min(lc, l3) : lc;
  const acc_t d_lc = -adv * (tie_share_greater(l1, l2) + tie_share_greater(l2, l1) * inside(ratio, low, high));
  acc_t d_pg = (negative ? tie_share_less(lc, l3) : acc_t(1)) * d_lc * d_ratio;
  const bool clipped = l2 > l1, clipped_lower = (lc > l3) && negative;
  if (P.keeps_expert_rows && tok[token::kExpert] != 0) {
    const acc_t p = std::exp(lp);
    if (P.mode == Mode::kLuffy) {  // -A p / (p + gamma)
      const acc_t gamma = static_cast<acc_t>(P.luffy_gamma);
      l_pg = -adv * p / (p + gamma);
      d_pg = -adv * gamma * p / ((p + gamma) * (p + gamma));
    } else {  // rlplus: -A 2p / (w p_old + mix) * sg(1 - p)^power, linear in p
      const acc_t focal = std::pow(std::max(acc_t(1) - p, acc_t(0)), static_cast<acc_t>(P.rlplus_focal_power));
      l_pg = -adv * acc_t(2) * p /
             (static_cast<acc_t>(P.rlplus_old_weight) * std::exp(old_lp) + static_cast<acc_t>(P.rlplus_mix)) * focal;
      d_pg = l_pg;
    }
  }
  acc_t d_loss_d_lp = weighted(c_loss, d_pg);
  acc_t guide = 0;
  if (P.uses_guide) {  // w act(z), z = -s (lp - b)
    const acc_t sign = tok[token::kSign], w = tok[token::kGuideWeight];
    acc_t act, slope;
    guide_activation(-sign * (lp - tok[token::kBaseline]), P, &act, &slope);
    guide = weighted(c_guide, w * act);
    d_loss_d_lp += static_cast<acc_t>(P.guide_coef) * weighted(c_guide, w * slope * -sign);
  }
  out[row::kCoefA] = -d_loss_d_lp;
  out[row::kCoefB] = P.entropy_coef != 0 ? static_cast<acc_t>(P.entropy_coef) * weighted(c_loss, acc_t(1)) : acc_t(0);
  out[row::kPg] = weighted(c_loss, l_pg);
  out[row::kGuide] = guide;
  out[row::kEntropyLoss] = weighted(c_loss, entropy);
  out[row::kEntropyMetric] = weighted(tok[token::kCEntropyMetric], entropy);
  out[row::kClipfrac] = weighted(c_all, clipped ? acc_t(1) : acc_t(0));
  out[row::kClipfracLower] = weighted(c_all, clipped_lower ? acc_t(1) : acc_t(0));
  out[row::kPpoKl] = weighted(c_all, old_lp - lp);
}

// ---------------------------------------------------------------------------------------------
// (c) gradient of one row: out_j = [a (p_j - [j = y]) + b p_j (z_j - lse + H)] / temperature
// ---------------------------------------------------------------------------------------------
// `out` may alias `row` (in place). A token with target < 0 (ignored) or a = b = 0 (masked, or no incoming
// gradient) gets an exactly zero row without reading its logits: no 0 * NaN from a row of all -inf
// logits (padding), and padding rows cost one write.
template <typename scalar_t, typename acc_t>
CALIBRL_INLINE void row_gradient_body(const scalar_t* row,       // the row's V raw logits (unit stride)
                                      scalar_t* out,             // its V gradient entries (may be `row`)
                                      int64_t vocab,             // V
                                      int64_t target,            // y, or -1 for an ignored token
                                      acc_t row_max,             // max of the raw logits (RowStats)
                                      acc_t log_sum,             // log sum_j e^((x_j - row_max) / T) (RowStats)
                                      acc_t entropy,             // H of the row
                                      acc_t a,                   // -dL/dlp (times the incoming gradient)
                                      acc_t b,                   // -dL/dH (times the incoming gradient)
                                      acc_t inv_temperature) {   // 1 / T
  if (target < 0 || (a == acc_t(0) && b == acc_t(0))) {
    std::fill(out, out + vocab, scalar_t(0));
    return;
  }
  // log p_j = u_j - log_sum, u_j = shifted_logit(x_j) (see shifted_logit for why not z_j - lse)
  const acc_t log_p_target = shifted_logit(static_cast<acc_t>(row[target]), row_max, inv_temperature) - log_sum;
  const acc_t at = a * inv_temperature, bt = b * inv_temperature;  // read above before an in-place write
  if (b == acc_t(0)) {
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) {
      out[j] = static_cast<scalar_t>(
          at * exp_fast(shifted_logit(static_cast<acc_t>(row[j]), row_max, inv_temperature) - log_sum));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) {
      const acc_t log_p = shifted_logit(static_cast<acc_t>(row[j]), row_max, inv_temperature) - log_sum;
      const acc_t p = exp_fast(log_p);
      const acc_t g = p * (at + bt * (log_p + entropy));
      out[j] = static_cast<scalar_t>(p == acc_t(0) ? acc_t(0) : g);  // no 0 * inf at z = -inf; NaN stays NaN
    }
  }
  const acc_t p_target = exp_fast(log_p_target);
  const acc_t g_target = p_target == acc_t(0) ? acc_t(0) : p_target * (at + bt * (log_p_target + entropy));
  out[target] = static_cast<scalar_t>(g_target - at);
}

}  // namespace calibrl
