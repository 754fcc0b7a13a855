// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The router losses and statistics, shared by every backend: what each loss is (written once,
//! here, on RouterLossConfig), the correction-bias update rule, and the argument checks of
//! `router_losses`, `expert_token_counts` and `update_correction_bias`. Host implementation:
//! host/router_losses.hpp.
//!
//! Sources (the definitions below follow them; where they differ, the comment says which is kept):
//! - Switch Transformer load-balancing loss: Fedus, Zoph, Shazeer, "Switch Transformers",
//!   arXiv:2101.03961, §2.2 eq. (4)-(6): loss = alpha * N * sum_i f_i * P_i. Top-k form with f_i
//!   over the T·k slots: KempnerForge `SoftmaxTopKRouter` (kempnerforge/model/router.py,
//!   github.com/KempnerInstitute/KempnerForge): f = tokens_per_expert / (num_tokens * top_k).
//! - Sequence-wise auxiliary loss: DeepSeek-V3 technical report, arXiv:2412.19437, §2.1.2
//!   "Complementary Sequence-Wise Auxiliary Loss", eq. (17)-(20): per sequence of T tokens,
//!   f_i = N_r / (K_r T) · (slots of the sequence routed to i), s'_{i,t} = s_{i,t} / sum_j s_{j,t},
//!   P_i = 1/T sum_t s'_{i,t}, L = alpha sum_i f_i P_i. The mean over the sequences of a batch is
//!   DeepSeek's `MoEGate` with `seq_aux` (modeling_deepseek.py on the Hugging Face hub:
//!   `(ce * scores.mean(dim=1)).sum(dim=1).mean() * alpha`). That code averages the raw sigmoid
//!   scores; epx keeps the paper's normalised s' (a probability, so the loss is 1 at balance).
//! - Router z-loss: Zoph et al., "ST-MoE", arXiv:2202.08906, §3.1 eq. (5):
//!   1/B sum_t (log sum_i exp(x_{t,i}))^2; KempnerForge: `(torch.logsumexp(logits, -1) ** 2).mean()`.
//! - Auxiliary-loss-free balancing: Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for
//!   Mixture-of-Experts", arXiv:2408.15664, Algorithm 1: e_i = mean_j c_j - c_i,
//!   b_i = b_i + u · sign(e_i); used by DeepSeek-V3 (arXiv:2412.19437 §2.1.2, "bias update speed"
//!   gamma). (KempnerForge's `SigmoidTopKRouter` uses a proportional EMA variant instead.)

#include <epx/config.hpp>
#include <epx/core/router_config.hpp>
#include <epx/core/views.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>

namespace epx {

//! The coefficients of the router losses; 0 switches a loss's gradient off (its value is still
//! computed, for monitoring). Semantics (host and, later, CUDA alike), for T tokens, E experts,
//! top_k = k:
//!
//! - p[t, i], the router probability of expert i for token t: softmax over all E logits of the
//!   token (Scoring::kSoftmaxTopK and kTopKSoftmax), or sigmoid(logit_i) / sum_j sigmoid(logit_j)
//!   (kSigmoidTopK; DeepSeek-V3's s'). The correction bias never enters p.
//! - c[i]: the slots (t, j) with topk_ids[t, j] == i — the ids forward chose (the correction bias
//!   and the group limit included), -1 slots counted nowhere. Counts are piecewise constant in the
//!   logits: no gradient flows through them.
//! 1. load_balancing (Switch / Mixtral): L_lb = E · sum_i f_i · P_i with f_i = c[i] / (T·k) (the
//!    fraction of slots, -1 slots included in T·k) and P_i = 1/T · sum_t p[t, i]. 1 at balance.
//! 2. sequence_aux (DeepSeek-V3): the tokens form sequences, sequence s holding tokens
//!    [offsets[s], offsets[s+1]); per non-empty sequence of T_s tokens, L_s = E · sum_i f_i · P_i
//!    with f_i, P_i as in 1 over that sequence's tokens only; L_seq = the mean of L_s over the
//!    non-empty sequences. No offsets means one sequence of all tokens, and then L_seq == L_lb.
//! 3. z_loss (ST-MoE): L_z = 1/T · sum_t (logsumexp_i logits[t, i])^2.
//!
//! With T = 0 every value is 0. The gradient of
//! load_balancing·L_lb + sequence_aux·L_seq + z_loss·L_z with respect to the logits is **added**
//! to d_logits, so that it combines with `route_backward`'s (which writes d_logits): call
//! route_backward first, then router_losses.
struct RouterLossConfig {
  float load_balancing = 0.0f;  //!< Switch Transformer's alpha (typically 1e-2)
  float sequence_aux = 0.0f;    //!< DeepSeek-V3's alpha (1e-4 in DeepSeek-V3)
  float z_loss = 0.0f;          //!< ST-MoE's z-loss coefficient (typically 1e-3)
};

//! What `router_losses` returns: each loss unweighted (for logging), and `total`, the weighted sum
//! whose gradient was added to d_logits.
struct RouterLossValues {
  double load_balancing = 0.0;
  double sequence_aux = 0.0;
  double z_loss = 0.0;
  double total = 0.0;  //!< load_balancing·L_lb + sequence_aux·L_seq + z_loss·L_z (coefficients)
};

namespace detail {

//! Throws an Error naming the first coefficient of `c` that is negative or not finite.
inline void validate(RouterLossConfig const& c, std::string_view where = "RouterLossConfig") {
  auto check = [&](std::string_view name, float v) {
    require(std::isfinite(v) && v >= 0.0f, Errc::kInvalidArgument, where, name, v, "a finite number >= 0");
  };
  check("losses.load_balancing", c.load_balancing);
  check("losses.sequence_aux", c.sequence_aux);
  check("losses.z_loss", c.z_loss);
}

//! Sequence offsets: empty (one sequence), or [num_sequences + 1] with offsets[0] = 0,
//! non-decreasing, offsets.back() = num_tokens. Empty sequences are allowed.
inline void check_sequence_offsets(std::string_view where, std::span<std::int64_t const> offsets,
                                   std::int64_t num_tokens) {
  if (offsets.empty()) return;
  require(offsets.size() >= 2, Errc::kShapeMismatch, where, "sequence_offsets.size()", offsets.size(),
          "0 (one sequence) or num_sequences + 1 >= 2");
  require(offsets.front() == 0, Errc::kInvalidArgument, where, "sequence_offsets[0]", offsets.front(), "0");
  for (std::size_t s = 1; s < offsets.size(); ++s)
    if (offsets[s] < offsets[s - 1])
      throw_error(Errc::kInvalidArgument,
                  fmt::format("{}: sequence_offsets[{}] = {}, expected >= sequence_offsets[{}] = {} (non-decreasing)",
                              where, s, offsets[s], s - 1, offsets[s - 1]));
  if (offsets.back() != num_tokens)
    throw_error(Errc::kInvalidArgument,
                fmt::format("{}: sequence_offsets[{}] = {}, expected num_tokens = {} (logits.rows)", where,
                            offsets.size() - 1, offsets.back(), num_tokens));
}

//! Every id is -1 or in [0, num_experts); else Errc::kInvalidExpertId naming the slot.
inline void check_topk_id_range(std::string_view where, MatrixView<std::int32_t const> topk_ids,
                                std::int32_t num_experts) {
  for (std::int64_t t = 0; t < topk_ids.rows; ++t)
    for (std::int64_t j = 0; j < topk_ids.cols; ++j) {
      std::int32_t const id = topk_ids(t, j);
      if (id != -1 && (id < 0 || id >= num_experts))
        throw_error(Errc::kInvalidExpertId,
                    fmt::format("{}: topk_ids[{}, {}] = {}, expected -1 or in [0, num_experts = "
                                "{})",
                                where, t, j, id, num_experts));
    }
}

template <class L>
void check_router_loss_args(RouterConfig const& config, RouterLossConfig const& losses, MatrixView<L const> logits,
                            MatrixView<std::int32_t const> topk_ids, std::span<std::int64_t const> sequence_offsets,
                            MatrixView<float> d_logits) {
  constexpr std::string_view where = "router_losses";
  validate(config, where);
  validate(losses, where);
  check_matrix(where, "logits", logits, -1, config.num_experts);
  check_matrix(where, "topk_ids", topk_ids, logits.rows, config.top_k);
  check_matrix(where, "d_logits", d_logits, logits.rows, config.num_experts);
  check_sequence_offsets(where, sequence_offsets, logits.rows);
  check_topk_id_range(where, topk_ids, config.num_experts);
}

//! DeepSeek's update direction for expert i: sign(mean_j c_j - c_i) in {-1, 0, +1}, computed
//! exactly in integers (mean = total / num_experts, so sign(total - c_i · num_experts)).
EPX_HOST_DEVICE constexpr int correction_bias_direction(std::int64_t count, std::int64_t total,
                                                        std::int32_t num_experts) noexcept {
  std::int64_t const scaled = count * num_experts;
  return scaled < total ? 1 : (scaled > total ? -1 : 0);
}

}  // namespace detail
}  // namespace epx
