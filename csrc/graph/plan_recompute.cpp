// Pass 7: recomputation. A value the backward reads may be dropped after the forward and
// re-made just before its first backward reader by re-running the step that produced it
// (same Op, same kernel, same inputs, same RunContext seed and node_index: bitwise the same
// bytes, dropout masks and saved statistics included), into a buffer that lives only until
// its last backward reader. Its inputs must then be alive: kept, or recomputed themselves.
//
// What to recompute is a prefix of one list of units, cheapest bytes first:
//   1. cheap steps one by one (norms, activations, elementwise, reshapes, softmax: cost
//      Op::flops() within kCheapFlopsPerElement per output element), by cost per byte saved,
//      each only once its inputs are live in the backward anyway (else recomputing it would
//      keep its inputs alive instead and save nothing);
//   2. whole blocks, also by cost per byte saved: every other step between two checkpoints.
//      Checkpoints are the values alive across a transformer block boundary (the
//      residual-stream Adds and what the blocks share, e.g. the attention mask), which are
//      always kept.
// Level "cheap" is the first part, "full" both; under a budget the shortest prefix whose
// arena fits is taken (binary search: the arena shrinks, up to placement noise, as the
// prefix grows; the search keeps a prefix known to fit).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>

#include "graph/plan_passes.h"

namespace pyedge {
namespace {

constexpr double kCheapFlopsPerElement = 16.0;

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(bytes) / double(1 << 20));
  return buf;
}

}  // namespace

std::vector<Plan::Step> backward_timeline(const std::vector<Plan::Step>& fwd, const PlanBuild& b,
                                          const std::vector<bool>& recompute) {
  const int B = int(b.backward.size());
  // first_use[r]: the timeline slot (before backward step k) where root r must exist.
  std::vector<int> first_use(b.root.size(), INT_MAX);
  for (size_t r = 0; r < b.root.size(); ++r)
    if (b.first_backward_read[r] >= 0) first_use[r] = b.first_backward_read[r];
  std::vector<std::vector<int>> before(size_t(B) + 1);  // forward steps re-run before step k
  for (size_t f = fwd.size(); f-- > 0;) {  // readers before producers: chains resolve in order
    if (!recompute[f]) continue;
    int at = INT_MAX;
    for (int v : fwd[f].out_ids) at = std::min(at, first_use[size_t(v)]);
    PYEDGE_CHECK(at != INT_MAX, "internal: recomputing a step nothing in the backward reads");
    before[size_t(at)].push_back(int(f));
    for (int v : fwd[f].in_ids) {
      if (v < 0 || !b.in_arena[size_t(v)]) continue;
      const int r = b.root[size_t(v)], p = b.producer[size_t(r)];
      if (p >= 0 && recompute[size_t(p)]) first_use[size_t(r)] = std::min(first_use[size_t(r)], at);
    }
  }
  std::vector<Plan::Step> out;
  out.reserve(size_t(B) + fwd.size());
  for (int k = 0; k <= B; ++k) {
    std::sort(before[size_t(k)].begin(), before[size_t(k)].end());  // producers first
    for (int f : before[size_t(k)]) {
      Plan::Step s = fwd[size_t(f)];
      s.recompute = true;
      s.need_grad.clear();
      s.din.clear();
      s.dout.clear();
      out.push_back(std::move(s));
    }
    if (k < B) out.push_back(b.backward[size_t(k)]);
  }
  return out;
}

void Plan::choose_recompute(const Model& model, const PlanRequest& req, PlanBuild& b) {
  const size_t F = fwd_.size();
  for (const Step& s : fwd_) stats_.forward_flops += s.op->flops();
  stats_.arena_budget = req.arena_budget;
  stats_.fixed_bytes = req.fixed_bytes;
  std::vector<bool> none(F, false);
  MemoryLayout base = layout_memory(b, none);
  stats_.arena_bytes_no_recompute = stats_.arena_bytes_min = base.arena_bytes;
  // What the caller gets is copied out of the arena (run()'s logits exist twice at its end).
  for (int v : req.targets)
    if (v >= 0 && v != loss_) stats_.output_copy_bytes += int64_t(values_[size_t(v)].nbytes());
  // Under a budget the smallest plan does not meet: ops with a smaller-scratch path take it
  // (LoraMatMul unmerged), and the layouts are made again.
  auto reduce_scratch = [&]() {
    for (const Step& s : fwd_) stats_.scratch_reduced_ops += s.op->reduce_scratch() ? 1 : 0;
    return stats_.scratch_reduced_ops > 0;
  };
  auto scratch_note = [&]() {
    return stats_.scratch_reduced_ops ? str_cat("; ", stats_.scratch_reduced_ops, " ops on their "
                                                "smaller-scratch path (LoRA unmerged)")
                                      : std::string();
  };
  auto finish = [&](MemoryLayout&& m, const std::vector<bool>& chosen, std::string why) {
    for (size_t f = 0; f < F; ++f)
      if (chosen[f]) {
        const NodeInfo& n = model.nodes[size_t(fwd_[f].node)].info;
        ++stats_.recompute_ops;
        ++stats_.recompute_op_types[op_key(n.domain, n.op_type)];
        stats_.recompute_nodes.push_back(n.name);
        stats_.recompute_flops += fwd_[f].op->flops();
      }
    stats_.recompute_choice = std::move(why) + scratch_note();
    commit_layout(model, b, std::move(m));
    stats_.planned_peak_bytes = req.fixed_bytes + std::max(stats_.arena_bytes, req.arena_floor) +
                                stats_.constant_bytes + stats_.output_copy_bytes;
  };
  // Beside the session's other plans (their shared arena is held) this plan cannot fit,
  // whatever it recomputes: the session drops them and plans again (session.cpp).
  if (req.budget_is_hard && req.arena_budget >= 0 && req.arena_floor > 0 &&
      req.arena_floor + stats_.constant_bytes + stats_.output_copy_bytes > req.arena_budget)
    throw Error(str_cat(req.budget_source, " cannot hold this plan beside the session's other "
                        "plans (their shared arena of ", mib(req.arena_floor), ")"));
  if (loss_ < 0) {
    // A forward-only plan (run(), evaluation): nothing to recompute, everything dies at its
    // last forward reader already; under a budget it must fit as it is, outputs included.
    const int64_t outs = stats_.output_copy_bytes;
    auto need = [&](const MemoryLayout& m) { return m.arena_bytes + stats_.constant_bytes + outs; };
    if (req.arena_budget >= 0 && need(base) > req.arena_budget && reduce_scratch())
      base = layout_memory(b, none);
    if (req.budget_is_hard && req.arena_budget >= 0 && need(base) > req.arena_budget) {
      const int64_t min_total = req.fixed_bytes + need(base);
      std::string what;
      for (int v : req.targets) {
        if (v < 0 || v == loss_) continue;
        what += str_cat(what.empty() ? "" : ", ", "'", model.value_name(v), "' ",
                        shape_str(values_[size_t(v)].shape));
      }
      throw Error(str_cat(
          req.budget_source, " is below what a forward pass returning ",
          what.empty() ? std::string("its outputs") : what, " needs at these input shapes: "
          "the minimum is ", min_total, " bytes (", mib(min_total), ": ", mib(req.fixed_bytes),
          " weights, parameters, gradients and optimizer state + ", mib(need(base) - outs),
          " activations + ", mib(outs), " outputs copied to the caller; a forward pass has "
          "nothing to recompute); run a smaller batch, ask for fewer outputs, evaluate a "
          "causal LM through its loss (TrainingSession.evaluate_loss: no logits), or raise "
          "the budget"));
    }
    finish(std::move(base), none, "none (no backward)");
    return;
  }
  if (req.recompute == PlanRequest::Recompute::kNone ||
      (req.recompute == PlanRequest::Recompute::kAuto &&
       (req.arena_budget < 0 ||
        base.arena_bytes + stats_.constant_bytes <= req.arena_budget))) {
    if (loss_ >= 0 && req.budget_is_hard && req.arena_budget >= 0 &&
        base.arena_bytes + stats_.constant_bytes > req.arena_budget)
      throw Error(str_cat("the plan needs ", mib(req.fixed_bytes + base.arena_bytes +
                          stats_.constant_bytes), " without recomputation, over ",
                          req.budget_source, " (recompute='none' was asked)"));
    finish(std::move(base), none,
           req.recompute == PlanRequest::Recompute::kNone ? "none (asked)"
           : req.arena_budget < 0                           ? "none (no budget)"
                                       : str_cat("none (fits ", req.budget_source, ")"));
    return;
  }

  // Candidates: steps whose outputs the backward reads, none of them kept to the end or
  // sharing storage with an input (an aliasing step's output lives as long as its input).
  const size_t nv = values_.size();
  std::vector<bool> candidate(F, false);
  std::vector<double> saved(F, 0.0), cost(F, 0.0);
  for (size_t f = 0; f < F; ++f) {
    const Step& s = fwd_[f];
    bool ok = true, read = false;
    for (int v : s.out_ids) {
      ok = ok && b.root[size_t(v)] == v && !b.kept[size_t(v)];
      if (b.first_backward_read[size_t(v)] >= 0) {
        read = true;
        saved[f] += double(values_[size_t(v)].nbytes());
      }
    }
    candidate[f] = ok && read && s.op->recomputable();
    cost[f] = s.op->flops();
  }
  // Checkpoints: residual Adds (z = x + y, both inputs needing a gradient as wide as z) where
  // the forward is cut down to z and what all blocks share (values made before the first
  // residual Add: the attention mask, rotary tables). live_across[t]: bytes made at or before
  // step t that a later forward step reads; shared[t]: the part made before the first Add.
  std::vector<size_t> residual;
  for (size_t t = 0; t < F; ++t) {
    const Step& s = fwd_[t];
    if (s.in_ids.size() == 2 && s.in_ids[0] >= 0 && s.in_ids[1] >= 0 &&
        b.in_arena[size_t(s.in_ids[0])] && b.in_arena[size_t(s.in_ids[1])] &&
        s.op->both_grads_are_dy({true, true}))
      residual.push_back(t);
  }
  std::vector<int> last_fwd_read(nv, -1);
  for (size_t t = 0; t < F; ++t)
    for (int v : fwd_[t].in_ids)
      if (v >= 0 && b.in_arena[size_t(v)]) last_fwd_read[size_t(b.root[size_t(v)])] = int(t);
  std::vector<double> delta(F + 1, 0.0), delta_shared(F + 1, 0.0);
  for (size_t v = 0; v < nv; ++v)
    if (b.in_arena[v] && b.root[v] == int(v) && b.producer[v] >= 0 &&
        last_fwd_read[v] > b.producer[v]) {
      const double bytes = double(values_[v].nbytes());
      delta[size_t(b.producer[v])] += bytes;
      delta[size_t(last_fwd_read[v])] -= bytes;
      if (!residual.empty() && size_t(b.producer[v]) < residual[0]) {
        delta_shared[size_t(b.producer[v])] += bytes;
        delta_shared[size_t(last_fwd_read[v])] -= bytes;
      }
    }
  std::vector<double> live_across(F, 0.0), shared(F, 0.0);
  for (size_t t = 0; t < F; ++t) {
    live_across[t] = (t ? live_across[t - 1] : 0.0) + delta[t];
    shared[t] = (t ? shared[t - 1] : 0.0) + delta_shared[t];
  }
  std::vector<size_t> boundaries;
  for (size_t t : residual) {
    const double z = double(values_[size_t(fwd_[t].out_ids[0])].nbytes());
    if (live_across[t] - shared[t] <= 1.25 * z) boundaries.push_back(t);
  }
  std::vector<bool> pinned(F, false);  // producers of checkpoints
  for (size_t t : boundaries)
    for (size_t v = 0; v < nv; ++v)
      if (b.in_arena[v] && b.root[v] == int(v) && b.producer[v] >= 0 &&
          b.producer[v] <= int(t) && last_fwd_read[v] > int(t))
        pinned[size_t(b.producer[v])] = true;

  // Part 1: cheap steps, cheapest per byte first, each once its inputs are live anyway.
  std::vector<size_t> cheap;
  for (size_t f = 0; f < F; ++f) {
    double elems = 0;
    for (int v : fwd_[f].out_ids) elems += double(values_[size_t(v)].numel());
    if (candidate[f] && !pinned[f] && cost[f] <= kCheapFlopsPerElement * std::max(elems, 1.0))
      cheap.push_back(f);
  }
  std::stable_sort(cheap.begin(), cheap.end(), [&](size_t x, size_t y) {
    return cost[x] / saved[x] < cost[y] / saved[y];
  });
  std::vector<bool> in_units(F, false);
  std::vector<std::vector<size_t>> units;
  auto live_anyway = [&](size_t f) {
    for (int v : fwd_[f].in_ids) {
      if (v < 0 || !b.in_arena[size_t(v)]) continue;
      const int r = b.root[size_t(v)], p = b.producer[size_t(r)];
      if (b.first_backward_read[size_t(r)] < 0 && !b.kept[size_t(r)] &&
          !(p >= 0 && in_units[size_t(p)]))
        return false;
    }
    return true;
  };
  for (bool grew = true; grew;) {
    grew = false;
    for (size_t f : cheap)
      if (!in_units[f] && live_anyway(f)) {
        in_units[f] = true;
        units.push_back({f});
        grew = true;
      }
  }
  const size_t n_cheap = units.size();
  // Part 2: the blocks between checkpoints, in forward order: a block's candidates and,
  // back from them, the steps in the block that make their inputs (a frozen projection
  // before its bias Add, say), which the backward itself never reads.
  std::vector<bool> eligible(F, false);
  for (size_t f = 0; f < F; ++f) {
    bool ok = !pinned[f] && !in_units[f] && fwd_[f].op->recomputable();
    for (int v : fwd_[f].out_ids) ok = ok && b.root[size_t(v)] == v && !b.kept[size_t(v)];
    eligible[f] = ok;
  }
  size_t seg_begin = 0;
  for (size_t i = 0; i <= boundaries.size(); ++i) {
    const size_t seg_end = i < boundaries.size() ? boundaries[i] + 1 : F;  // [begin, end)
    std::vector<bool> take(F, false);
    for (size_t f = seg_end; f-- > seg_begin;) {
      take[f] = take[f] || (eligible[f] && candidate[f]);
      if (!take[f]) continue;
      for (int v : fwd_[f].in_ids) {
        if (v < 0 || !b.in_arena[size_t(v)]) continue;
        const int p = b.producer[size_t(b.root[size_t(v)])];
        if (p >= int(seg_begin) && eligible[size_t(p)]) take[size_t(p)] = true;
      }
    }
    std::vector<size_t> block;
    for (size_t f = seg_begin; f < seg_end; ++f)
      if (take[f]) block.push_back(f);
    if (!block.empty()) units.push_back(std::move(block));
    seg_begin = seg_end;
  }
  // Blocks by cost per byte too: the transformer blocks alike, a block that ends in a large
  // projection of few bytes (the LM head before the loss) last.
  auto per_byte = [&](const std::vector<size_t>& u) {
    double c = 0, by = 0;
    for (size_t f : u) c += cost[f], by += saved[f];
    return c / std::max(by, 1.0);
  };
  std::stable_sort(units.begin() + std::ptrdiff_t(n_cheap), units.end(),
                   [&](const auto& x, const auto& y) { return per_byte(x) < per_byte(y); });

  auto chosen_for = [&](size_t n_units) {
    std::vector<bool> c(F, false);
    for (size_t u = 0; u < n_units; ++u)
      for (size_t f : units[u]) c[f] = true;
    return c;
  };
  const int64_t consts = stats_.constant_bytes;
  std::vector<bool> all = chosen_for(units.size());
  MemoryLayout full = layout_memory(b, all);
  if (req.arena_budget >= 0 && full.arena_bytes + consts > req.arena_budget && reduce_scratch()) {
    full = layout_memory(b, all);
    base = layout_memory(b, none);
    if (req.recompute == PlanRequest::Recompute::kAuto &&
        base.arena_bytes + consts <= req.arena_budget) {  // that was enough
      stats_.arena_bytes_min = std::min(base.arena_bytes, full.arena_bytes);
      finish(std::move(base), none, str_cat("none (fits ", req.budget_source, ")"));
      return;
    }
  }
  stats_.arena_bytes_min = std::min(base.arena_bytes, full.arena_bytes);
  const std::string units_str = str_cat(n_cheap, " cheap steps, ", units.size() - n_cheap,
                                        " blocks between ", boundaries.size(), " checkpoints");
  if (req.recompute == PlanRequest::Recompute::kCheap ||
      req.recompute == PlanRequest::Recompute::kFull) {
    const bool is_full = req.recompute == PlanRequest::Recompute::kFull;
    std::vector<bool> c = is_full ? all : chosen_for(n_cheap);
    MemoryLayout m = is_full ? std::move(full) : layout_memory(b, c);
    if (req.budget_is_hard && req.arena_budget >= 0 && m.arena_bytes + consts > req.arena_budget)
      throw Error(str_cat("the plan needs ", mib(req.fixed_bytes + m.arena_bytes + consts),
                          " with recompute='", is_full ? "full" : "cheap", "', over ",
                          req.budget_source));
    finish(std::move(m), c, str_cat(is_full ? "full" : "cheap", " (asked; ", units_str, ")"));
    return;
  }
  // Under a budget: the shortest prefix that fits.
  const int64_t min_total = req.fixed_bytes + stats_.arena_bytes_min + consts;
  if (full.arena_bytes + consts > req.arena_budget) {
    if (req.budget_is_hard)
      throw Error(str_cat(req.budget_source, " is below what this model needs at these "
                          "input shapes: the minimum (with recomputation) is ", min_total,
                          " bytes (", mib(min_total), ": ", mib(req.fixed_bytes),
                          " weights, parameters, gradients and optimizer state + ",
                          mib(stats_.arena_bytes_min + consts), " activations); lower the "
                          "batch size or sequence length, or raise the budget"));
    if (base.arena_bytes <= full.arena_bytes) {
      finish(std::move(base), none, str_cat("none (", req.budget_source, " cannot be met)"));
    } else {
      finish(std::move(full), all,
             str_cat("full (", req.budget_source, " cannot be met: the smallest plan; ",
                     units_str, ")"));
    }
    return;
  }
  size_t lo = 0, hi = units.size();  // prefix lo does not fit, prefix hi does
  MemoryLayout best = std::move(full);
  while (hi - lo > 1) {
    const size_t mid = lo + (hi - lo) / 2;
    MemoryLayout m = layout_memory(b, chosen_for(mid));
    if (m.arena_bytes + consts <= req.arena_budget) {
      hi = mid;
      best = std::move(m);
    } else {
      lo = mid;
    }
  }
  finish(std::move(best), chosen_for(hi),
         str_cat(hi, " of ", units.size(), " units (", units_str, ") to fit ",
                 req.budget_source));
}

}  // namespace pyedge
