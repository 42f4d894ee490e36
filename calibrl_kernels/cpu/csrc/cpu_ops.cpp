// Tensor entry points of the CalibRL CPU backend (built on first use by calibrl_kernels/build.py).
//
// Every op works on logits (n, V) or (B, T, V) with unit stride along V (any other strides), one token per row,
// in parallel over rows with at::parallel_for (torch's OpenMP pool, so torch.set_num_threads applies):
//   row_stats     (a) lse, entropy, logp per row                          -> row table
//   row_gradient  (c) dL/dlogits from the row table's row_max, log_sum, entropy, a, b -> out (may be the logits)
//   row_loss      (a) + (b) loss terms and a = -dL/dlp, b = -dL/dH + optionally (c) in place, row by row
//                 while the row is in cache                               -> row table (+ logits)
// The row math itself is in cpu_ops.h; table layouts are those of calibrl_kernels/reference/coefficients.py.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <map>
#include <string>

#include "cpu_ops.h"

namespace calibrl {
namespace {

// ---------------------------------------------------------------------------------------------
// Row ranges (the parallel work items); CALIBRL_HOT compiles them per instruction set.
// ---------------------------------------------------------------------------------------------
// A token's target, or -1 when it is ignored. Targets were checked (check_target_values) before the parallel
// region, so nothing here throws.
inline int64_t target_of(const int64_t* targets,  // (n,) targets
                         int64_t i,               // the token's row
                         int64_t ignore_index,    // the target value of ignored tokens
                         int64_t /*vocab*/) {     // V: other targets lie in [0, V)
  const int64_t t = targets[i];
  return t == ignore_index ? -1 : t;
}

// Where row i of a (n, V) or (B, T, V) logits tensor starts (unit stride along V, any other strides).
struct RowLayout {
  int64_t rows;          // n = B * T
  int64_t vocab;         // V
  int64_t inner_rows;    // T (n for a 2-d tensor)
  int64_t inner_stride;  // stride between rows t and t + 1 of one sequence
  int64_t outer_stride;  // stride between sequences b and b + 1 (unused for a 2-d tensor)

  int64_t offset(int64_t i) const { return (i / inner_rows) * outer_stride + (i % inner_rows) * inner_stride; }
};

// (a) for one row: lse always; entropy and logp 0 for an ignored token.
template <typename scalar_t, typename acc_t>
CALIBRL_INLINE void stats_one(const scalar_t* row,      // the row's V raw logits
                              int64_t vocab,            // V
                              int64_t target,           // y, or -1 (ignored)
                              acc_t inv_temperature,    // 1 / T
                              acc_t* out) {             // its row-table row: kLogp, kEntropy, kLse written
  const RowStats<acc_t> st = row_stats_body<scalar_t, acc_t>(row, vocab, inv_temperature);
  out[row::kLse] = st.lse;
  out[row::kRowMax] = st.row_max;
  out[row::kLogSum] = st.log_sum;
  out[row::kEntropy] = target < 0 ? acc_t(0) : st.entropy;
  const acc_t x_target = target < 0 ? acc_t(0) : static_cast<acc_t>(row[target]);
  out[row::kLogp] = target < 0 ? acc_t(0) : shifted_logit(x_target, st.row_max, inv_temperature) - st.log_sum;
}

template <typename scalar_t, typename acc_t>
CALIBRL_HOT void stats_range(const scalar_t* logits,    // raw logits, rows placed by layout
                             const RowLayout& layout,   // where row i starts, V
                             const int64_t* targets,    // (n,) targets
                             int64_t ignore_index,      // target value of ignored tokens
                             acc_t inv_temperature,     // 1 / T
                             acc_t* rows,               // (n, row::kCount) row table
                             int64_t begin,             // first row of this work item
                             int64_t end) {             // one past its last row
  for (int64_t i = begin; i < end; ++i) {
    stats_one(logits + layout.offset(i), layout.vocab, target_of(targets, i, ignore_index, layout.vocab),
              inv_temperature, rows + i * row::kCount);
  }
}

template <typename scalar_t, typename acc_t>
CALIBRL_HOT void gradient_range(const scalar_t* logits,        // raw logits, rows placed by layout
                                const RowLayout& layout,       // where logits row i starts, V
                                scalar_t* out,                 // gradient, rows placed by out_layout (may alias)
                                const RowLayout& out_layout,   // where gradient row i starts
                                const int64_t* targets,        // (n,) targets
                                int64_t ignore_index,          // target value of ignored tokens
                                acc_t inv_temperature,         // 1 / T
                                const acc_t* rows,             // (n, row::kCount): kRowMax, kLogSum, kEntropy, kCoefA,
                                                               // kCoefB read
                                int64_t begin,                 // first row of this work item
                                int64_t end) {                 // one past its last row
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* r = rows + i * row::kCount;
    row_gradient_body<scalar_t, acc_t>(logits + layout.offset(i), out + out_layout.offset(i), layout.vocab,
                                       target_of(targets, i, ignore_index, layout.vocab), r[row::kRowMax],
                                       r[row::kLogSum], r[row::kEntropy], r[row::kCoefA], r[row::kCoefB],
                                       inv_temperature);
  }
}

template <typename scalar_t, typename acc_t>
CALIBRL_HOT void loss_range(scalar_t* logits,              // raw logits, rows placed by layout (gradient written
                                                           // over them when form_gradient)
                            const RowLayout& layout,       // where row i starts, V
                            const int64_t* targets,        // (n,) targets
                            int64_t ignore_index,          // target value of ignored tokens
                            acc_t inv_temperature,         // 1 / T
                            const acc_t* tokens,           // (n, token::kCount) token table
                            acc_t* rows,                   // (n, row::kCount) row table, filled
                            const LossParams& params,      // loss mode, activation and constants
                            bool form_gradient,            // also write dL/dlogits over the logits
                            int64_t begin,                 // first row of this work item
                            int64_t end) {                 // one past its last row
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* row = logits + layout.offset(i);
    acc_t* r = rows + i * row::kCount;
    const int64_t target = target_of(targets, i, ignore_index, layout.vocab);
    stats_one(row, layout.vocab, target, inv_temperature, r);
    row_terms(r[row::kLogp], r[row::kEntropy], tokens + i * token::kCount, params, r);
    if (form_gradient) {
      row_gradient_body<scalar_t, acc_t>(row, row, layout.vocab, target, r[row::kRowMax], r[row::kLogSum],
                                         r[row::kEntropy],
                                         r[row::kCoefA], r[row::kCoefB], inv_temperature);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks and parameters
// ---------------------------------------------------------------------------------------------
RowLayout check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, ": expected a CPU tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, name, ": expected shape (n, V) or (B, T, V), got ",
              logits.sizes());
  TORCH_CHECK(logits.size(-1) >= 1, name, ": expected a vocabulary of at least one entry, got ", logits.sizes());
  TORCH_CHECK(logits.stride(-1) == 1 || logits.size(-1) == 1, name, ": expected unit stride along V, got strides ",
              logits.strides());
  const int64_t vocab = logits.size(-1), rows = logits.numel() / vocab;
  if (logits.dim() == 2) return {rows, vocab, std::max<int64_t>(rows, 1), logits.stride(0), 0};
  return {rows, vocab, std::max<int64_t>(logits.size(1), 1), logits.stride(1), logits.stride(0)};
}

void check_table(const at::Tensor& table, const char* name, int64_t rows, int64_t columns, at::ScalarType dtype) {
  TORCH_CHECK(table.device().is_cpu() && table.is_contiguous(), name, ": expected a contiguous CPU tensor");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == rows && table.size(1) == columns, name, ": expected shape (",
              rows, ", ", columns, "), got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", table.scalar_type());
}

void check_targets(const at::Tensor& targets, int64_t rows) {
  TORCH_CHECK(targets.device().is_cpu() && targets.is_contiguous() && targets.scalar_type() == at::kLong,
              "targets: expected a contiguous CPU int64 tensor, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == rows, "targets: expected shape (", rows, ",), got ",
              targets.sizes());
}

// Every target lies in [0, V) or equals ignore_index: checked serially on the calling thread, before any
// parallel region (O(n) next to the O(n V) row work), and always, whatever CALIBRL_VALUE_CHECKS says: an index
// outside the row would read or write out of bounds.
void check_target_values(const at::Tensor& targets, int64_t ignore_index, int64_t vocab) {
  const int64_t* t = targets.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < vocab), "targets: expected values in [0, ", vocab,
                      ") or ignore_index=", ignore_index, ", got ", t[i], " at row ", i);
  }
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The checks of every entry point: its logits, targets (their values too) and row table; the logits' layout.
RowLayout check_row_inputs(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                           const at::Tensor& rows) {
  const RowLayout layout = check_logits(logits, "logits");
  check_targets(targets, layout.rows);
  check_target_values(targets, ignore_index, layout.vocab);
  check_table(rows, "rows", layout.rows, row::kCount, accumulation_type(logits.scalar_type()));
  return layout;
}

double param(const std::map<std::string, double>& values, const std::string& key) {
  const auto it = values.find(key);
  TORCH_CHECK(it != values.end(), "loss parameters: missing ", key);
  return it->second;
}

LossParams parse_params(const std::string& mode, const std::string& activation,
                        const std::map<std::string, double>& values) {
  static const std::map<std::string, Mode> modes = {{"calibrl", Mode::kCalibrl}, {"grpo", Mode::kGrpo},
                                                    {"dapo", Mode::kDapo},       {"drgrpo", Mode::kDrgrpo},
                                                    {"luffy", Mode::kLuffy},     {"rlplus", Mode::kRlplus}};
  static const std::map<std::string, Activation> activations = {
      {"leaky_relu", Activation::kLeakyRelu}, {"relu", Activation::kRelu}, {"tanh", Activation::kTanh},
      {"sigmoid", Activation::kSigmoid},      {"huber", Activation::kHuber}, {"none", Activation::kNone}};
  TORCH_CHECK(modes.count(mode), "mode: unknown ", mode);
  TORCH_CHECK(activations.count(activation), "activation: unknown ", activation);
  LossParams p;
  p.mode = modes.at(mode);
  p.activation = activations.at(activation);
  p.keeps_expert_rows = p.mode == Mode::kLuffy || p.mode == Mode::kRlplus;
  p.uses_guide = p.mode == Mode::kCalibrl && p.activation != Activation::kNone;
  // config.KERNEL_SCALARS and KERNEL_CONSTANTS, by the names the Python side hands them over with
  static const std::pair<const char*, double LossParams::*> scalars[] = {
      {"clip_low", &LossParams::clip_low},             {"clip_high", &LossParams::clip_high},
      {"dual_clip_c", &LossParams::dual_clip_c},       {"guide_coef", &LossParams::guide_coef},
      {"negative_slope", &LossParams::negative_slope}, {"huber_delta", &LossParams::huber_delta},
      {"entropy_coef", &LossParams::entropy_coef},     {"log_ratio_clamp", &LossParams::log_ratio_clamp},
      {"luffy_gamma", &LossParams::luffy_gamma},       {"rlplus_old_weight", &LossParams::rlplus_old_weight},
      {"rlplus_mix", &LossParams::rlplus_mix},         {"rlplus_focal_power", &LossParams::rlplus_focal_power}};
  for (const auto& [key, member] : scalars) p.*member = param(values, key);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------
// (a) per row. logits (n, V) / (B, T, V), any float dtype, unit stride along V.
void row_stats(const at::Tensor& logits,   // raw logits, one token per row
               const at::Tensor& targets,  // (n,) int64, contiguous
               double inv_temperature,     // 1 / T
               int64_t ignore_index,       // target value of ignored tokens
               at::Tensor rows) {          // (n, row::kCount) row table (float; double for double logits)
  const RowLayout layout = check_row_inputs(logits, targets, ignore_index, rows);
  const int64_t n = layout.rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "calibrl_row_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    acc_t* r = rows.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      stats_range<scalar_t, acc_t>(data, layout, t, ignore_index, static_cast<acc_t>(inv_temperature), r, begin, end);
    });
  });
}

// (c) per row: out = dL/dlogits from the row table's row_max, log_sum, entropy, a, b (a = b = 0: a zero row).
void row_gradient(const at::Tensor& logits,  // raw logits, one token per row
                  const at::Tensor& targets, // (n,) int64, contiguous
                  const at::Tensor& rows,    // (n, row::kCount) row table: kRowMax, kLogSum, kEntropy, kCoefA,
                                             // kCoefB read
                  double inv_temperature,    // 1 / T
                  int64_t ignore_index,      // target value of ignored tokens
                  at::Tensor out) {          // the gradient, shape and dtype of logits (may be logits itself)
  const RowLayout layout = check_row_inputs(logits, targets, ignore_index, rows);
  const RowLayout out_layout = check_logits(out, "out");
  const int64_t n = layout.rows;
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type(),
              "out: expected the shape and dtype of logits ", logits.sizes(), " ", logits.scalar_type(), ", got ",
              out.sizes(), " ", out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "calibrl_row_gradient", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const acc_t* r = rows.const_data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      gradient_range<scalar_t, acc_t>(data, layout, o, out_layout, t, ignore_index, static_cast<acc_t>(inv_temperature),
                                      r, begin, end);
    });
  });
}

// (a) + (b) [+ (c) in place] per row.
void row_loss(at::Tensor logits,                            // raw logits; dL/dlogits when form_gradient
              const at::Tensor& targets,                    // (n,) int64, contiguous
              const at::Tensor& tokens,                     // (n, token::kCount) token table
              at::Tensor rows,                              // (n, row::kCount) row table, filled
              const std::string& mode,                      // CalibRLConfig.mode
              const std::string& activation,                // CalibRLConfig.activation
              const std::map<std::string, double>& values,  // the numeric loss parameters (loss_params())
              double inv_temperature,                       // 1 / T
              int64_t ignore_index,                         // target value of ignored tokens
              bool form_gradient) {                         // also write the gradient over the logits
  const RowLayout layout = check_row_inputs(logits, targets, ignore_index, rows);
  const int64_t n = layout.rows;
  check_table(tokens, "tokens", n, token::kCount, accumulation_type(logits.scalar_type()));
  const LossParams params = parse_params(mode, activation, values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "calibrl_row_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* data = logits.data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const acc_t* tok = tokens.const_data_ptr<acc_t>();
    acc_t* r = rows.data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      loss_range<scalar_t, acc_t>(data, layout, t, ignore_index, static_cast<acc_t>(inv_temperature), tok, r, params,
                                  form_gradient, begin, end);
    });
  });
}

std::map<std::string, int64_t> layout() {
  return {{"token_count", token::kCount}, {"row_count", row::kCount},     {"old_logp", token::kOldLogp},
          {"advantage", token::kAdvantage}, {"baseline", token::kBaseline}, {"sign", token::kSign},
          {"guide_weight", token::kGuideWeight}, {"expert", token::kExpert}, {"c_loss", token::kCLoss},
          {"c_guide", token::kCGuide}, {"c_entropy_metric", token::kCEntropyMetric}, {"c_all", token::kCAll},
          {"row.logp", row::kLogp}, {"row.entropy", row::kEntropy}, {"row.lse", row::kLse},
          {"row.row_max", row::kRowMax}, {"row.log_sum", row::kLogSum},
          {"row.coef_a", row::kCoefA}, {"row.coef_b", row::kCoefB}, {"row.pg", row::kPg},
          {"row.guide", row::kGuide}, {"row.entropy_loss", row::kEntropyLoss},
          {"row.entropy_metric", row::kEntropyMetric}, {"row.clipfrac", row::kClipfrac},
          {"row.clipfrac_lower", row::kClipfracLower}, {"row.ppo_kl", row::kPpoKl}};
}

}  // namespace
}  // namespace calibrl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CalibRL CPU row kernels on logits chunks (see cpu_ops.h)";
  m.def("row_stats", &calibrl::row_stats, "(a) lse, entropy, logp of each row into the row table", py::arg("logits"),
        py::arg("targets"), py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("rows"));
  m.def("row_gradient", &calibrl::row_gradient, "(c) dL/dlogits from the row table into out (may alias logits)",
        py::arg("logits"), py::arg("targets"), py::arg("rows"), py::arg("inv_temperature"), py::arg("ignore_index"),
        py::arg("out"));
  m.def("row_loss", &calibrl::row_loss, "(a)+(b)+(c) row by row; the gradient replaces the logits in place",
        py::arg("logits"), py::arg("targets"), py::arg("tokens"), py::arg("rows"), py::arg("mode"),
        py::arg("activation"), py::arg("params"), py::arg("inv_temperature"), py::arg("ignore_index"),
        py::arg("form_gradient"));
  m.def("layout", &calibrl::layout, "column indices of the token and row tables");
}
