#pragma once
// GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
// Projection"): full-rank training of a weight W (m x n) with Adam's state kept in a rank-r
// subspace of its gradient G.
//
// Every T steps (GaloreConfig::update_gap) P (m x r) and Q (n x r), the top-r left and right
// singular vectors of the current G, are taken anew. Each step then
//
//   one-sided (the default, GaLore's own code):  R = P^T G  (r x n)  when m <= n,
//                                                R = G Q    (m x r)  when m > n;
//   two-sided (the seeds' formula):              R = P^T G Q (r x r);
//   Adam's moments and bias correction on R:     N = m_hat / (sqrt(v_hat) + eps);
//   AdamW's decoupled decay, then the update:    W -= lr wd W;
//                                                W -= lr alpha (P N, N Q^T or P N Q^T).
//
// Two-sided, at a step that takes a new subspace from its own gradient, R = P^T G Q is diagonal
// up to rounding; Adam's normalisation gives each off-diagonal entry, rounding noise, an update
// of about lr alpha whose sign any change of precision or device flips (the algorithm's, in any
// implementation). An eps above that noise (and below the singular values) damps it.
//
// Adam's state is r x n (or m x r, or r x r) instead of m x n: with P it is 2 r n + m r numbers
// instead of Adam's 2 m n. Parameters that are not base weights (biases, LoRA adapters, DoRA's
// magnitude), that are not matrices, or that have fewer than GaloreConfig::min_elements entries
// get plain Adam (Adam's own kernels, with the same settings). Weight decay coupled to the
// gradient (decoupled_weight_decay = false) is refused for projected weights: it would need the
// full m x n sum G + wd W before the projection.
//
// Adam's element-wise rule is not written again: the moments of R are updated by Adam's kernels
// (lib/optimizers/adam_kernels.hpp) with R as the gradient and a zeroed buffer as the
// "parameter", which thereby receives -lr alpha N; a GEMM adds its projection back to W.
//
// Subspace changes (MomentsAtRefresh): the moments live in the coordinates of the old basis.
// `keep` leaves them as they are (GaLore's code; cheap, and with a slowly turning subspace the
// coordinates still roughly match); `reset` zeroes them and the update count (the next step is
// bias-corrected as a first one); `reproject` carries them into the new basis with
// C = P_new^T P_old (and D = Q_new^T Q_old): m <- C m (m D^T), v <- (C.C) v ((D.D)^T), the
// second moment through the squared rotation so that it stays non-negative (exact when the
// coordinates are uncorrelated).
//
// Singular vectors are unique up to sign (for distinct singular values): each pair is flipped so
// that the largest-magnitude entry of the vector GaLore uses (P; Q when only Q is used) is
// positive, ties to the lower index. The CPU and CUDA backends, and a run and its resumed copy,
// then hold the same P.
//
// Recorded steps (CUDA graphs, Trainer's use_graphs): a step without an SVD is a fixed sequence
// of GEMMs and Adam's kernels and is recorded and replayed like Adam's. An SVD cannot be
// recorded: before a step that takes a new subspace GaLore allocates a one-element marker
// tensor, which makes the backend's recording stale (Backend::replay), so that step runs
// eagerly and the next one is recorded anew, once every T steps.
//
// NaN or Inf in a gradient refuses the whole step: on the CPU before anything changes; on CUDA
// Adam's device guard refuses the update of every parameter (the projected R of a non-finite G
// is not finite), and before an SVD the gradients are checked on the host, so that a refused
// step never changes a subspace either.
//
// Saved state (save_state): per projected parameter "<param>.m", "<param>.v", "<param>.step"
// (the update count, 1 x 1), "<param>.P" and/or "<param>.Q", field "<param>.refreshed_at" (the
// step of its last SVD, -1 before the first: P and Q are then not saved); the plain-Adam
// parameters' "<param>.m", "<param>.v", "<param>.step" as Adam names them; fields "steps_taken",
// "prune_draws", and "rank" and "projection" (a state of another rank or mode is refused).
// The SVD schedule is a function of steps_taken and refreshed_at, so a resumed run refreshes at
// the same steps and continues bit for bit.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "relora/optimizers/adam.hpp"
#include "relora/optimizers/optimizer.hpp"

namespace relora {

enum class GaloreProjection {
  one_sided,  // R = P^T G if m <= n, else G Q (GaLore's code)
  two_sided,  // R = P^T G Q
};

// What happens to Adam's moments of R when the subspace changes (see the file comment).
enum class MomentsAtRefresh { keep, reset, reproject };

// How P and Q are found.
enum class SubspaceMethod {
  exact,       // a full SVD: Eigen's BDCSVD in double on the CPU, cuSOLVER's gesvd on CUDA
  randomized,  // a randomized range finder (Halko et al. 2011): subspace iteration on the
               // backend's GEMM, orthonormalised by Householder QR, then a Rayleigh-Ritz step
  gram,        // the leading eigenvectors of the short side's Gram matrix G G^T (or G^T G), formed
               // by the backend's GEMM and solved by Eigen's SelfAdjointEigenSolver in double on the
               // CPU, cuSOLVER's syevdx (only the top r) on CUDA; the other side's vectors, where the
               // two-sided projection wants them, are G^T U (G V) orthonormalised. The same subspace
               // as the SVD's in exact arithmetic; squaring G limits it to singular values above
               // about sqrt(epsilon) of the largest (3e-4 in float), below which a direction holds
               // less than 1e-7 of the gradient's energy
};

struct GaloreConfig {
  double lr = 1e-3;                                      // every group's learning rate unless the group sets its own
  double beta1 = 0.9;                                    // Adam's moments, as AdamConfig
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0;                               // decoupled (AdamW) on every parameter
  bool decoupled_weight_decay = true;                    // false (L2 in the gradient): plain-Adam parameters only
  Index rank = 128;                                      // r, 1 <= r <= min(m, n) of every projected weight
  std::int64_t update_gap = 200;                         // T: steps between two SVDs of a weight's gradient
  double scale = 0.25;                                   // alpha, multiplying the projected update
  GaloreProjection projection = GaloreProjection::one_sided;
  MomentsAtRefresh moments = MomentsAtRefresh::keep;
  SubspaceMethod subspace = SubspaceMethod::gram;
  Index oversample = 8;                                  // randomized: extra columns of the sketch
  int power_iterations = 4;                              // randomized: passes of subspace iteration
                                                         // (each two GEMMs and two QRs; more passes,
                                                         // closer to the exact subspace)
  std::uint64_t seed = 0;                                // randomized: the sketch's random streams
  Index min_elements = 0;                                // weights with fewer entries get plain Adam
};

const char* projection_name(GaloreProjection projection);
const char* moments_name(MomentsAtRefresh moments);
const char* subspace_name(SubspaceMethod method);
// Parse the names above ("one_sided", "two_sided"; "keep", "reset", "reproject"; "exact", "gram",
// "randomized"); ConfigError naming the text otherwise.
GaloreProjection parse_projection(const std::string& text);
MomentsAtRefresh parse_moments(const std::string& text);
SubspaceMethod parse_subspace(const std::string& text);

template <typename T>
class AdamKernels;
template <typename T>
class GaloreKernels;  // lib/optimizers/galore_kernels.hpp
template <typename T>
class RangeFinder;  // lib/optimizers/galore_subspace.hpp
template <typename T>
class GramFinder;  // lib/optimizers/galore_subspace.hpp

template <typename T>
class Galore final : public Optimizer<T> {
 public:
  // Throws ConfigError naming the value (and the parameter and its shape) for a rank of 0 or
  // above min(m, n) of a projected weight, an update gap of 0, a scale that is not finite, an
  // invalid Adam setting; nothing is allocated then.
  Galore(std::shared_ptr<Backend<T>> backend, std::vector<ParamGroup<T>> groups, const GaloreConfig& config = {});
  Galore(std::shared_ptr<Backend<T>> backend, std::vector<Parameter<T>> params, const GaloreConfig& config = {});
  ~Galore() override;
  Galore(const Galore&) = delete;
  Galore& operator=(const Galore&) = delete;

  const char* kind() const override { return "galore"; }
  // A step refused for a NaN or Inf gradient changes nothing, the subspaces included.
  void step(double lr_factor = 1) override;
  // Zeroes the moments and update counts; a projected weight also takes a new subspace at its
  // next step.
  void reset_state(const ParameterSelector<T>& which) override;
  void prune_state(const ParameterSelector<T>& which, double fraction, PruneMode mode,
                   std::uint64_t seed = 0) override;

  std::size_t size() const override { return order_.size(); }
  const Parameter<T>& parameter(std::size_t i) const override;
  std::int64_t steps_taken() const override { return steps_taken_; }
  void set_steps_taken(std::int64_t steps) override { steps_taken_ = steps; }

  void save_state(StateDict<T>& state) const override;
  void check_state(const StateDict<T>& state) const override;
  void restore_state(const StateDict<T>& state) override;

  const GaloreConfig& config() const { return config_; }
  // Whether parameter i is projected, and its projection's tensors (empty when not used).
  bool projected(std::size_t i) const;
  const Tensor<T>& P(std::size_t i) const;
  const Tensor<T>& Q(std::size_t i) const;
  const Tensor<T>& m(std::size_t i) const;
  const Tensor<T>& v(std::size_t i) const;
  const Tensor<T>& update_count(std::size_t i) const;
  // Bytes of optimizer state (moments, update counts, P, Q) and of reused workspace.
  std::size_t state_bytes() const;
  std::size_t workspace_bytes() const;
  // SVDs (or range finders) run so far, and the seconds they took in all (waits for the backend).
  std::int64_t refreshes() const { return refreshes_; }
  double refresh_seconds() const { return refresh_seconds_; }

 private:
  struct Projected;
  struct Entry {
    bool projected;
    std::size_t index;  // into projected_ or dense_params_
  };

  void refresh(Projected& p);
  void project_gradient(Projected& p);
  void apply_update(Projected& p);
  bool refresh_due(const Projected& p) const;
  void make_recordings_stale();

  std::shared_ptr<Backend<T>> backend_;
  GaloreConfig config_;
  std::vector<ParamGroup<T>> groups_;
  std::vector<Entry> order_;
  std::vector<std::unique_ptr<Projected>> projected_;
  std::vector<const Parameter<T>*> dense_params_;
  std::vector<Tensor<T>> dense_m_, dense_v_, dense_step_;
  std::unique_ptr<AdamKernels<T>> adam_;  // dense parameters' and projected moments' updates
  std::unique_ptr<GaloreKernels<T>> kernels_;
  std::unique_ptr<RangeFinder<T>> range_finder_;  // SubspaceMethod::randomized only
  std::unique_ptr<GramFinder<T>> gram_finder_;    // SubspaceMethod::gram only
  Tensor<T> scratch_;                // two-sided products and re-projection, sized for the largest weight
  Tensor<T> old_p_, old_q_;          // the previous bases (MomentsAtRefresh::reproject)
  Tensor<T> rotation_, rotation_sq_;  // C = P_new^T P_old and C.C (r x r)
  std::vector<Tensor<T>> stale_markers_;  // allocated to make a recorded step stale before an SVD step
  std::int64_t steps_taken_ = 0;
  std::uint64_t prune_draws_ = 0;
  std::int64_t refreshes_ = 0;
  double refresh_seconds_ = 0;
};

extern template class Galore<float>;
extern template class Galore<double>;

}  // namespace relora
