#include "relora/optimizers/galore.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include "optimizers/adam_kernels.hpp"
#include "optimizers/galore_kernels.hpp"
#include "optimizers/adam_hyperparameters.hpp"
#include "optimizers/galore_projected.hpp"
#include "optimizers/galore_subspace.hpp"
#include "relora/core/host_matrix.hpp"

namespace relora {
namespace {

void validate(const GaloreConfig& c) {
  check_adam_hyperparameters("GaLore", c.lr, c.beta1, c.beta2, c.eps, c.weight_decay);
  auto check = [](bool ok, const std::string& what) {
    if (!ok) throw ConfigError("GaLore: " + what);
  };
  check(c.rank >= 1, "rank " + std::to_string(c.rank) + " must be >= 1");
  check(c.update_gap >= 1, "update_gap (T) " + std::to_string(c.update_gap) + " must be >= 1");
  check(std::isfinite(c.scale) && c.scale > 0, "scale " + std::to_string(c.scale) + " must be finite and > 0");
  check(c.oversample >= 0, "oversample " + std::to_string(c.oversample) + " must be >= 0");
  check(c.power_iterations >= 0, "power_iterations " + std::to_string(c.power_iterations) + " must be >= 0");
  check(c.min_elements >= 0, "min_elements " + std::to_string(c.min_elements) + " must be >= 0");
  const int projection = int(c.projection), moments = int(c.moments), subspace = int(c.subspace);
  check(projection == 0 || projection == 1, "unknown projection mode " + std::to_string(projection));
  check(moments >= 0 && moments <= 2, "unknown moments-at-refresh mode " + std::to_string(moments));
  check(subspace >= 0 && subspace <= 2, "unknown subspace method " + std::to_string(subspace));
}

}  // namespace

const char* projection_name(GaloreProjection projection) {
  return projection == GaloreProjection::one_sided ? "one_sided" : "two_sided";
}
const char* moments_name(MomentsAtRefresh moments) {
  switch (moments) {
    case MomentsAtRefresh::keep: return "keep";
    case MomentsAtRefresh::reset: return "reset";
    case MomentsAtRefresh::reproject: return "reproject";
  }
  return "?";
}
const char* subspace_name(SubspaceMethod method) {
  switch (method) {
    case SubspaceMethod::exact: return "exact";
    case SubspaceMethod::randomized: return "randomized";
    case SubspaceMethod::gram: return "gram";
  }
  return "?";
}

GaloreProjection parse_projection(const std::string& text) {
  if (text == "one_sided") return GaloreProjection::one_sided;
  if (text == "two_sided") return GaloreProjection::two_sided;
  throw ConfigError("GaLore: unknown projection mode '" + text + "' (one_sided or two_sided)");
}
MomentsAtRefresh parse_moments(const std::string& text) {
  if (text == "keep") return MomentsAtRefresh::keep;
  if (text == "reset") return MomentsAtRefresh::reset;
  if (text == "reproject") return MomentsAtRefresh::reproject;
  throw ConfigError("GaLore: unknown moments-at-refresh mode '" + text + "' (keep, reset or reproject)");
}
SubspaceMethod parse_subspace(const std::string& text) {
  if (text == "exact") return SubspaceMethod::exact;
  if (text == "randomized") return SubspaceMethod::randomized;
  if (text == "gram") return SubspaceMethod::gram;
  throw ConfigError("GaLore: unknown subspace method '" + text + "' (exact, gram or randomized)");
}

template <typename T>
Galore<T>::Galore(std::shared_ptr<Backend<T>> backend, std::vector<Parameter<T>> params, const GaloreConfig& config)
    : Galore(std::move(backend), std::vector<ParamGroup<T>>{ParamGroup<T>{"all", std::move(params), -1, -1}},
             config) {}

template <typename T>
Galore<T>::Galore(std::shared_ptr<Backend<T>> backend, std::vector<ParamGroup<T>> groups, const GaloreConfig& config)
    : backend_(std::move(backend)), config_(config), groups_(std::move(groups)) {
  if (!backend_) throw ConfigError("GaLore: no backend given");
  validate(config_);
  const Index r = config_.rank;
  // Every check before the first allocation: a refused configuration allocates nothing.
  std::set<const Tensor<T>*> seen;
  std::set<std::string> names;
  // The longest and the shortest side of the projected weights (the SVD's workspace), the
  // largest moment and two-sided product, the largest basis (re-projection's copy of it).
  Index max_long = 1, max_short = 1, max_moment = 1, max_two_sided = 1, max_basis = 1;
  for (const ParamGroup<T>& group : groups_) {
    const double lr = group.lr < 0 ? config_.lr : group.lr;
    const double wd = group.weight_decay < 0 ? config_.weight_decay : group.weight_decay;
    if (!std::isfinite(lr)) throw ConfigError("GaLore: group '" + group.name + "' has lr " + std::to_string(lr));
    for (const Parameter<T>& p : group.params) {
      check_optimizer_parameter("GaLore", p, seen, names);
      const Index m = p.value->rows(), n = p.value->cols();
      const bool projected = p.role == ParamRole::base_weight && m > 1 && n > 1 && m * n >= config_.min_elements;
      if (!projected) continue;
      if (r > std::min(m, n)) {
        throw ConfigError("GaLore: rank " + std::to_string(r) + " exceeds min(m, n) = " +
                          std::to_string(std::min(m, n)) + " of weight '" + p.name + "' " + p.value->shape());
      }
      if (!config_.decoupled_weight_decay && wd > 0) {
        throw ConfigError("GaLore: weight '" + p.name + "' " + p.value->shape() + " has weight decay " +
                          std::to_string(wd) + " coupled to the gradient (decoupled_weight_decay = false), which " +
                          "a projected weight cannot take; use the decoupled decay");
      }
      max_long = std::max(max_long, std::max(m, n));
      max_short = std::max(max_short, std::min(m, n));
      const bool two = config_.projection == GaloreProjection::two_sided;
      const Index moment = two ? r * r : (m <= n ? r * n : m * r);
      max_moment = std::max(max_moment, moment);
      if (two) max_two_sided = std::max(max_two_sided, r * n);
      max_basis = std::max(max_basis, std::max(m, n) * r);
    }
  }

  std::vector<AdamSlot<T>> slots;
  for (const ParamGroup<T>& group : groups_) {
    const double lr = group.lr < 0 ? config_.lr : group.lr;
    const double wd = group.weight_decay < 0 ? config_.weight_decay : group.weight_decay;
    for (const Parameter<T>& p : group.params) {
      const Index m = p.value->rows(), n = p.value->cols();
      const bool projected = p.role == ParamRole::base_weight && m > 1 && n > 1 && m * n >= config_.min_elements;
      if (!projected) {
        order_.push_back({false, dense_params_.size()});
        dense_params_.push_back(&p);
        dense_m_.push_back(backend_->allocate(m, n));
        dense_v_.push_back(backend_->allocate(m, n));
        dense_step_.push_back(backend_->allocate(1, 1));
        backend_->fill(dense_m_.back(), T(0));
        backend_->fill(dense_v_.back(), T(0));
        backend_->fill(dense_step_.back(), T(0));
        continue;
      }
      auto x = std::make_unique<Projected>();
      x->param = &p;
      x->index = projected_.size();
      x->rows = m;
      x->cols = n;
      x->lr = lr;
      x->weight_decay = wd;
      const bool two = config_.projection == GaloreProjection::two_sided;
      x->uses_p = two || m <= n;
      x->uses_q = two || m > n;
      if (x->uses_p) x->P = backend_->allocate(m, r);
      if (x->uses_q) x->Q = backend_->allocate(n, r);
      const Index mr = x->moment_rows(), mc = x->moment_cols();
      x->R = backend_->allocate(mr, mc);
      x->N = backend_->allocate(mr, mc);
      x->m = backend_->allocate(mr, mc);
      x->v = backend_->allocate(mr, mc);
      x->step = backend_->allocate(1, 1);
      for (Tensor<T>* t : {&x->m, &x->v, &x->step}) backend_->fill(*t, T(0));
      if (x->uses_p) backend_->fill(x->P, T(0));
      if (x->uses_q) backend_->fill(x->Q, T(0));
      order_.push_back({true, projected_.size()});
      projected_.push_back(std::move(x));
    }
  }
  // Adam's kernels over the plain parameters, then the projected moments: a projected weight's
  // "parameter" is its N, zeroed before each update, its "gradient" R, its lr scaled by alpha.
  for (std::size_t i = 0; i < dense_params_.size(); ++i) {
    const Parameter<T>& p = *dense_params_[i];
    AdamSlot<T> slot;
    slot.param = p.value->data();
    slot.grad = p.grad->data();
    slot.m = dense_m_[i].data();
    slot.v = dense_v_[i].data();
    slot.step = dense_step_[i].data();
    slot.size = p.value->size();
    slot.name = p.name.c_str();
    // The dense parameter's lr and decay are its group's: found again here by its place.
    for (const ParamGroup<T>& group : groups_) {
      for (const Parameter<T>& q : group.params) {
        if (&q != &p) continue;
        slot.lr = group.lr < 0 ? config_.lr : group.lr;
        slot.weight_decay = group.weight_decay < 0 ? config_.weight_decay : group.weight_decay;
      }
    }
    slots.push_back(slot);
  }
  for (const auto& x : projected_) {
    AdamSlot<T> slot;
    slot.param = x->N.data();
    slot.grad = x->R.data();
    slot.m = x->m.data();
    slot.v = x->v.data();
    slot.step = x->step.data();
    slot.size = x->R.size();
    slot.lr = x->lr * config_.scale;
    slot.weight_decay = 0;  // W's decay is applied to W itself (GaloreKernels::decay)
    slot.name = x->param->name.c_str();
    slots.push_back(slot);
  }
  adam_ = make_adam_kernels(*backend_, std::move(slots));
  kernels_ = make_galore_kernels(*backend_, max_long, max_short);
  if (!projected_.empty()) {
    scratch_ = backend_->allocate(1, std::max(max_two_sided, max_moment));
    if (config_.moments == MomentsAtRefresh::reproject) {
      old_p_ = backend_->allocate(1, max_basis);
      old_q_ = backend_->allocate(1, max_basis);
      rotation_ = backend_->allocate(r, r);
      rotation_sq_ = backend_->allocate(r, r);
    }
    if (config_.subspace == SubspaceMethod::randomized) {
      range_finder_ =
          std::make_unique<RangeFinder<T>>(*backend_, *kernels_, max_long, r + config_.oversample);
    }
    if (config_.subspace == SubspaceMethod::gram) {
      gram_finder_ = std::make_unique<GramFinder<T>>(*backend_, *kernels_, max_short);
    }
  }
}

template <typename T>
Galore<T>::~Galore() = default;

template <typename T>
const Parameter<T>& Galore<T>::parameter(std::size_t i) const {
  const Entry& e = order_.at(i);
  return e.projected ? *projected_[e.index]->param : *dense_params_[e.index];
}

template <typename T>
bool Galore<T>::projected(std::size_t i) const { return order_.at(i).projected; }

template <typename T>
const Tensor<T>& Galore<T>::P(std::size_t i) const {
  const Entry& e = order_.at(i);
  if (!e.projected) throw ConfigError("GaLore: parameter '" + parameter(i).name + "' is not projected: it has no P");
  return projected_[e.index]->P;
}
template <typename T>
const Tensor<T>& Galore<T>::Q(std::size_t i) const {
  const Entry& e = order_.at(i);
  if (!e.projected) throw ConfigError("GaLore: parameter '" + parameter(i).name + "' is not projected: it has no Q");
  return projected_[e.index]->Q;
}
template <typename T>
const Tensor<T>& Galore<T>::m(std::size_t i) const {
  const Entry& e = order_.at(i);
  return e.projected ? projected_[e.index]->m : dense_m_[e.index];
}
template <typename T>
const Tensor<T>& Galore<T>::v(std::size_t i) const {
  const Entry& e = order_.at(i);
  return e.projected ? projected_[e.index]->v : dense_v_[e.index];
}

template <typename T>
const Tensor<T>& Galore<T>::update_count(std::size_t i) const {
  const Entry& e = order_.at(i);
  return e.projected ? projected_[e.index]->step : dense_step_[e.index];
}

template <typename T>
std::size_t Galore<T>::state_bytes() const {
  Index elements = 0;
  for (std::size_t i = 0; i < dense_m_.size(); ++i) elements += dense_m_[i].size() * 2 + 1;
  for (const auto& x : projected_) elements += x->m.size() + x->v.size() + 1 + x->P.size() + x->Q.size();
  return std::size_t(elements) * sizeof(T);
}

template <typename T>
std::size_t Galore<T>::workspace_bytes() const {
  Index elements = scratch_.size() + old_p_.size() + old_q_.size() + rotation_.size() + rotation_sq_.size();
  for (const auto& x : projected_) elements += x->R.size() + x->N.size();
  return std::size_t(elements) * sizeof(T) + (range_finder_ ? range_finder_->workspace_bytes() : 0) +
         (gram_finder_ ? gram_finder_->workspace_bytes() : 0) + kernels_->workspace_bytes();
}

template <typename T>
bool Galore<T>::refresh_due(const Projected& x) const {
  return x.refreshed_at < 0 || steps_taken_ - x.refreshed_at >= config_.update_gap;
}

template <typename T>
void Galore<T>::make_recordings_stale() {
  // A backend that records steps (CUDA graphs) counts allocations and treats a recording made
  // before one as stale (Backend::replay): the SVD step then runs eagerly, and a recording in
  // progress is discarded and run eagerly. The CPU backend never records.
  if (backend_->device() == Device::cpu) return;
  // The markers made so far are freed only outside a recording (freeing waits for the device,
  // which a stream capture does not allow): at most two are alive.
  if (!kernels_->recording()) stale_markers_.clear();
  stale_markers_.push_back(backend_->allocate(1, 1));
}

template <typename T>
void Galore<T>::refresh(Projected& x) {
  const Tensor<T>& G = *x.param->grad;
  const Index r = config_.rank;
  const bool reproject = config_.moments == MomentsAtRefresh::reproject && x.refreshed_at >= 0;
  Tensor<T> P_old, Q_old;
  if (reproject) {
    if (x.uses_p) {
      P_old = leading_view(old_p_, x.rows, r);
      backend_->copy(x.P, P_old);
    }
    if (x.uses_q) {
      Q_old = leading_view(old_q_, x.cols, r);
      backend_->copy(x.Q, Q_old);
    }
  }
  if (config_.subspace == SubspaceMethod::exact) {
    kernels_->top_singular_vectors(G, x.uses_p ? &x.P : nullptr, x.uses_q ? &x.Q : nullptr);
  } else if (config_.subspace == SubspaceMethod::gram) {
    // The short side's vectors from its Gram matrix (one-sided GaLore uses only those); the long
    // side's, for the two-sided projection, from them.
    const bool wide = x.rows <= x.cols;
    Tensor<T>& short_basis = wide ? x.P : x.Q;
    gram_finder_->top_left_vectors(G, !wide, short_basis);
    if (x.uses_p && x.uses_q) gram_finder_->right_vectors(G, !wide, short_basis, wide ? x.Q : x.P);
  } else {
    // One stream per weight and refresh: the same sketch on every backend and after a resume.
    const RngKey key{config_.seed, (std::uint64_t(steps_taken_) << 20) ^ std::uint64_t(x.index)};
    if (x.uses_p) range_finder_->top_left_vectors(G, false, config_.oversample, config_.power_iterations, key, x.P);
    if (x.uses_q) {
      range_finder_->top_left_vectors(G, true, config_.oversample, config_.power_iterations,
                                      RngKey{key.seed, key.stream ^ (std::uint64_t(1) << 63)}, x.Q);
    }
  }
  if (x.uses_p) {
    fix_signs(*backend_, x.P, x.uses_q ? &x.Q : nullptr);
  } else {
    fix_signs(*backend_, x.Q, static_cast<Tensor<T>*>(nullptr));
  }
  if (x.uses_p && x.uses_q && config_.subspace != SubspaceMethod::exact) {
    // The two range finders (or the Gram finder's QR) fix each vector's sign on their own;
    // u_j^T G v_j > 0 pairs them as an SVD does: the diagonal of P^T G Q (r x r, formed on the
    // device in R's buffer).
    Tensor<T> tmp = leading_view(scratch_, r, x.cols);
    backend_->gemm(Trans::yes, Trans::no, T(1), x.P, G, T(0), tmp);
    backend_->gemm(Trans::no, Trans::no, T(1), tmp, x.Q, T(0), x.R);
    const HostMatrix<T> pairing = to_host(*backend_, x.R);
    HostMatrix<T> q = to_host(*backend_, x.Q);
    bool flipped = false;
    for (Index j = 0; j < r; ++j) {
      if (pairing(j, j) < T(0)) {
        q.col(j) = -q.col(j);
        flipped = true;
      }
    }
    if (flipped) backend_->upload(q.data(), x.Q);
  }
  if (config_.moments == MomentsAtRefresh::reset) {
    backend_->fill(x.m, T(0));
    backend_->fill(x.v, T(0));
    backend_->fill(x.step, T(0));
  } else if (reproject) {
    // m <- C m D^T, v <- (C.C) v (D.D)^T with C = P_new^T P_old, D = Q_new^T Q_old.
    Tensor<T> tmp = leading_view(scratch_, x.m.rows(), x.m.cols());
    auto rotate = [&](const Tensor<T>& basis_new, const Tensor<T>& basis_old, bool on_left) {
      backend_->gemm(Trans::yes, Trans::no, T(1), basis_new, basis_old, T(0), rotation_);
      backend_->multiply(rotation_, rotation_, rotation_sq_);
      for (Tensor<T>* moment : {&x.m, &x.v}) {
        const Tensor<T>& c = moment == &x.m ? rotation_ : rotation_sq_;
        if (on_left) {
          backend_->gemm(Trans::no, Trans::no, T(1), c, *moment, T(0), tmp);
        } else {
          backend_->gemm(Trans::no, Trans::yes, T(1), *moment, c, T(0), tmp);
        }
        backend_->copy(tmp, *moment);
      }
    };
    if (x.uses_p) rotate(x.P, P_old, true);
    if (x.uses_q) rotate(x.Q, Q_old, false);
  }
  x.refreshed_at = steps_taken_;
}

template <typename T>
void Galore<T>::project_gradient(Projected& x) {
  const Tensor<T>& G = *x.param->grad;
  if (x.uses_p && x.uses_q) {
    Tensor<T> tmp = leading_view(scratch_, config_.rank, x.cols);
    backend_->gemm(Trans::yes, Trans::no, T(1), x.P, G, T(0), tmp);  // P^T G
    backend_->gemm(Trans::no, Trans::no, T(1), tmp, x.Q, T(0), x.R);  // (P^T G) Q
  } else if (x.uses_p) {
    backend_->gemm(Trans::yes, Trans::no, T(1), x.P, G, T(0), x.R);
  } else {
    backend_->gemm(Trans::no, Trans::no, T(1), G, x.Q, T(0), x.R);
  }
  backend_->fill(x.N, T(0));
}

template <typename T>
void Galore<T>::apply_update(Projected& x) {
  Tensor<T>& W = *x.param->value;
  // N holds -lr alpha N: W += P N (N Q^T, P N Q^T) with beta = 1.
  if (x.uses_p && x.uses_q) {
    Tensor<T> tmp = leading_view(scratch_, config_.rank, x.cols);
    backend_->gemm(Trans::no, Trans::yes, T(1), x.N, x.Q, T(0), tmp);
    backend_->gemm(Trans::no, Trans::no, T(1), x.P, tmp, T(1), W);
  } else if (x.uses_p) {
    backend_->gemm(Trans::no, Trans::no, T(1), x.P, x.N, T(1), W);
  } else {
    backend_->gemm(Trans::no, Trans::yes, T(1), x.N, x.Q, T(1), W);
  }
}

template <typename T>
void Galore<T>::step(double lr_factor) {
  if (!std::isfinite(lr_factor) || lr_factor < 0) {
    throw ConfigError("GaLore step: lr_factor " + std::to_string(lr_factor) + " must be finite and >= 0");
  }
  bool any_due = false;
  for (const auto& x : projected_) any_due = any_due || refresh_due(*x);
  const bool replaying = kernels_->refreshing();
  if (any_due && kernels_->recording()) {
    // An SVD cannot be recorded: spoil the recording, which the caller then runs eagerly.
    make_recordings_stale();
    ++steps_taken_;
    return;
  }
  if (any_due && replaying) {
    throw ConfigError("GaLore step: an SVD is due at step " + std::to_string(steps_taken_) +
                      " but the backend is replaying a recorded step");
  }
  // An error of an earlier step that the device found (a refused step on CUDA) is raised here,
  // before this step changes anything, rather than after its SVD.
  if (any_due) backend_->synchronize();
  // Refuse a step with a NaN or Inf gradient before anything changes: on the host where the
  // kernels cannot, and always before an SVD (which would take the bad gradient's subspace).
  if (kernels_->checks_on_host() || any_due) {
    auto check = [&](const Parameter<T>& p) {
      if (!std::isfinite(double(backend_->max_abs(*p.grad)))) {
        throw NonFiniteError("GaLore step refused: gradient of '" + p.name + "' " + p.grad->shape() +
                             " holds NaN or Inf; no parameter was updated");
      }
    };
    for (const auto& x : projected_) check(*x->param);
    for (const Parameter<T>* p : dense_params_) check(*p);
  }
  if (any_due) {
    const auto start = std::chrono::steady_clock::now();
    for (const auto& x : projected_) {
      if (refresh_due(*x)) {
        refresh(*x);
        ++refreshes_;
      }
    }
    backend_->synchronize();
    refresh_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  if (!replaying) {
    for (const auto& x : projected_) project_gradient(*x);
  }
  adam_->update(adam_hyper(config_, lr_factor));
  for (const auto& x : projected_) {
    if (x->weight_decay > 0) kernels_->decay(*x->param->value, x->lr * lr_factor * x->weight_decay);
    if (!replaying) apply_update(*x);
  }
  ++steps_taken_;
  bool next_due = false;
  for (const auto& x : projected_) next_due = next_due || refresh_due(*x);
  if (next_due) make_recordings_stale();
}

template <typename T>
void Galore<T>::reset_state(const ParameterSelector<T>& which) {
  bool new_subspace = false;
  for (std::size_t i = 0; i < dense_params_.size(); ++i) {
    if (!which(*dense_params_[i])) continue;
    backend_->fill(dense_m_[i], T(0));
    backend_->fill(dense_v_[i], T(0));
    backend_->fill(dense_step_[i], T(0));
  }
  for (const auto& x : projected_) {
    if (!which(*x->param)) continue;
    backend_->fill(x->m, T(0));
    backend_->fill(x->v, T(0));
    backend_->fill(x->step, T(0));
    x->refreshed_at = -1;
    new_subspace = true;
  }
  if (new_subspace) make_recordings_stale();
}

template <typename T>
void Galore<T>::prune_state(const ParameterSelector<T>& which, double fraction, PruneMode mode, std::uint64_t seed) {
  if (!(fraction >= 0 && fraction <= 1)) {
    throw ConfigError("GaLore prune_state: fraction " + std::to_string(fraction) + " must be in [0, 1]");
  }
  for (const Entry& e : order_) {
    if (e.projected) {
      Projected& x = *projected_[e.index];
      if (which(*x.param)) adam_->prune(mode, fraction, RngKey{seed, prune_draws_++}, x.m, x.v);
    } else if (which(*dense_params_[e.index])) {
      adam_->prune(mode, fraction, RngKey{seed, prune_draws_++}, dense_m_[e.index], dense_v_[e.index]);
    }
  }
}

template class Galore<float>;
template class Galore<double>;

}  // namespace relora
