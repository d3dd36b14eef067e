// Activations in 16 bits between layers (Model::set_activation_format), against their definition:
//
//   H_0 = round(X);  H_l = round(f_l(layer_l(widen(H_{l-1}))));  output = widen(H_L)
//   G_L = round(dLoss/doutput);  dY_l = widen(G_l) .* f_l'(H_l);  G_{l-1} = round(dX_l)
//
// round: to nearest even in the format; widen: exact; layer_l: the layer's fp32 math, whose dA, dB
// and db come from the fp32 dY_l and widen(H_{l-1}). Letters: n rows, L layers, u the format's unit
// roundoff (2^-8 bf16, 2^-11 fp16), s the adapter's scale; the host references run in double.
//
// Three checks of a model's step, from strict to loose:
// - chained, for layers the model converts around (every CPU layer, LayerChoice::reference on
//   CUDA): each layer's fp32 output and dX, and its dA, dB, db, against the math from the previous
//   layer's output rounded here as the model rounds it. Both sides round the same fp32 values, so
//   no rounding can flip between them: fp32 product accuracy, 1e-5 of the largest entry; and the
//   model's output must be the last layer's output rounded, bit for bit.
// - bounded, for any layer, the native CUDA ones (cuda_half: a bf16 base on bf16 activations)
//   included, which round the adapter's terms of Y and dX to the format before adding them to the
//   base's product (which cuBLAS may round too, before the addition): each layer's 16-bit output
//   (read from the layer where it keeps it) must lie, entry by entry, within a bound of the exact
//   math on its 16-bit input, and dA, dB, db within a bound propagated down from the top through
//   the gradients' roundings (check_bounds says how the bound is built). The bound is a few u of
//   the terms' magnitudes, so a wrong term, mask or scale lies far outside it.
// - the whole definition from the host weights alone: a value within fp32 error of a tie between
//   two format values rounds either way, and that one-ulp step travels up the layers, so the
//   output is compared within two format ulps of each entry, the gradients within u (Frobenius).
// A native layer alone is also run on values whose products are exact in fp32, where its
// roundings can be checked bit for bit.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "relora/relora.hpp"
#include "half_buffers.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::download_half_bits;
using relora::testing::upload_half_bits;
using relora::testing::normal_matrix;
using relora::testing::what_of;

namespace {

using Mat = HostMatrix<double>;

std::shared_ptr<Backend<float>> cpu() { return make_backend<float>(Device::cpu); }

std::string name_of(BasePrecision format) { return precision_name(format); }

// ---- rounding on the host

// x as an fp32 value rounded to nearest (ties to even) in `format` and widened back.
double round_to(double x, BasePrecision format) {
  return half_bits::half_to_float(half_bits::round_float(float(x), format, HalfRounding::nearest, 0.0f), format);
}

template <typename M>
Mat rounded(const M& m, BasePrecision format) {
  Mat r(m.rows(), m.cols());
  for (Index i = 0; i < r.rows(); ++i) {
    for (Index j = 0; j < r.cols(); ++j) r(i, j) = round_to(double(m(i, j)), format);
  }
  return r;
}

// The spacing of `format`'s values at magnitude |v| (its ulp there; the subnormals' below the
// smallest normal).
double spacing(double v, BasePrecision format) {
  const int fraction_bits = format == BasePrecision::bf16 ? 7 : 10;
  const int min_exponent = format == BasePrecision::bf16 ? -126 : -14;
  const double a = std::fabs(v);
  const int e = a > 0 ? std::max(std::ilogb(a), min_exponent) : min_exponent;
  return std::ldexp(1.0, e - fraction_bits);
}

// Half the spacing at |center| + slack, for every entry: how far rounding moves a value that lies
// within `slack` of `center`.
Mat half_spacing(const Mat& center, const Mat& slack, BasePrecision format) {
  Mat r(center.rows(), center.cols());
  for (Index i = 0; i < r.size(); ++i) {
    r.data()[i] = 0.5 * spacing(std::fabs(center.data()[i]) + slack.data()[i], format);
  }
  return r;
}

double max_abs(const Mat& m) { return m.size() == 0 ? 0.0 : m.cwiseAbs().maxCoeff(); }
// max |a - b| over max |b|.
double max_rel(const Mat& a, const Mat& b) { return max_abs(a - b) / std::max(max_abs(b), 1e-30); }
double frobenius_rel(const Mat& a, const Mat& b) { return (a - b).norm() / std::max(b.norm(), 1e-30); }
Mat wide(const HostMatrix<float>& m) { return m.cast<double>(); }
// ReLU's derivative read from its output: 1 where positive.
Mat positive(const Mat& H) { return (H.array() > 0.0).cast<double>().matrix(); }

// ---- models

struct LayerSpec {
  Index in = 0, out = 0, rank = 4;
  BasePrecision base = BasePrecision::fp32;
  Activation f = Activation::relu;
  BiasMode bias = BiasMode::none;
  double dropout = 0;
};

// Host values for a stack of layers: W ~ N(0, 1/k) keeps the outputs near unit size, s = 2 and B
// ~ N(0, 1/(4r)) make the adapter's term as large as the base's (so that an error in it shows).
struct Draw {
  std::vector<HostMatrix<float>> W, b, A, B;
};

Draw draw(const std::vector<LayerSpec>& specs, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  Draw d;
  for (const LayerSpec& spec : specs) {
    d.W.push_back(normal_matrix<float>(spec.out, spec.in, gen, 1.0 / std::sqrt(double(spec.in))));
    d.b.push_back(normal_matrix<float>(1, spec.out, gen, 0.2));
    d.A.push_back(normal_matrix<float>(spec.rank, spec.in, gen, 1.0 / std::sqrt(double(spec.in))));
    d.B.push_back(normal_matrix<float>(spec.out, spec.rank, gen, 0.5 / std::sqrt(double(spec.rank))));
  }
  return d;
}

LoraConfig config_of(const LayerSpec& spec, std::size_t i) {
  return LoraConfig{.in_features = spec.in, .out_features = spec.out, .rank = spec.rank,
                    .alpha = double(2 * spec.rank), .dropout = spec.dropout, .bias = spec.bias,
                    .seed = 100 + i, .base_precision = spec.base};
}

// A model of `specs` holding `d`'s values (a 16-bit base rounds W, and a frozen bias, to nearest).
Model<float> build(std::shared_ptr<Backend<float>> backend, LayerChoice choice, const std::vector<LayerSpec>& specs,
                   const Draw& d) {
  Model<float> model(std::move(backend), choice);
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const LoraConfig config = config_of(specs[i], i);
    LoraLinear<float>& layer =
        specs[i].bias == BiasMode::none
            ? model.add(config, specs[i].f, d.W[i])
            : model.add(config, specs[i].f, d.W[i], HostVector<float>(d.b[i].row(0).transpose()));
    layer.set_A(d.A[i]);
    layer.set_B(d.B[i]);
  }
  return model;
}

// A layer's values as the model holds them, read back.
struct HostLayer {
  Mat W, b, A, B;
  Mat mask;  // the last forward's dropout mask (n x k), empty when none
  double s = 1;
  bool relu = false, merged = false, bias_trains = false;
};

std::vector<HostLayer> host_layers(Model<float>& model) {
  Backend<float>& backend = model.backend();
  std::vector<HostLayer> layers;
  for (std::size_t i = 0; i < model.size(); ++i) {
    LoraLinear<float>& l = model.lora(i);
    HostLayer h;
    h.W = l.base().weight_host().cast<double>();
    h.b = l.has_bias() ? wide(to_host(backend, l.b())) : Mat(Mat::Zero(1, l.out_features()));
    h.A = wide(to_host(backend, l.A()));
    h.B = wide(to_host(backend, l.B()));
    if (l.training() && l.config().dropout > 0) h.mask = wide(to_host(backend, l.dropout_mask()));
    h.s = double(l.scale());
    h.relu = model.activation(i) == Activation::relu;
    h.merged = l.merged();
    h.bias_trains = l.config().bias == BiasMode::trainable;
    layers.push_back(std::move(h));
  }
  return layers;
}

// ---- the layer's math in double

struct LayerForward {
  Mat Xd, U, P, T, Y;  // D(X), U = D(X) A^T, P = X W^T + b, T = s U B^T (0 merged), Y = f(P + T)
};

LayerForward forward_math(const HostLayer& h, const Mat& X) {
  LayerForward r;
  r.Xd = h.mask.size() != 0 ? Mat(X.cwiseProduct(h.mask)) : X;
  r.U = r.Xd * h.A.transpose();
  r.P = X * h.W.transpose();
  r.P.rowwise() += h.b.row(0);
  r.T = h.merged ? Mat(Mat::Zero(r.P.rows(), r.P.cols())) : Mat(h.s * r.U * h.B.transpose());
  r.Y = r.P + r.T;
  if (h.relu) r.Y = r.Y.cwiseMax(0.0);
  return r;
}

struct LayerBackward {
  Mat dU, dA, dB, db, dX;
};

// dY: the gradient at the layer's output, f' applied.
LayerBackward backward_math(const HostLayer& h, const Mat& X, const Mat& dY) {
  LayerBackward r;
  const Mat Xd = h.mask.size() != 0 ? Mat(X.cwiseProduct(h.mask)) : X;
  const Mat U = Xd * h.A.transpose();
  r.dU = h.s * dY * h.B;
  r.dB = h.s * dY.transpose() * U;
  r.dA = r.dU.transpose() * Xd;
  r.db = dY.colwise().sum();
  Mat adapter = r.dU * h.A;
  if (h.mask.size() != 0) adapter = adapter.cwiseProduct(h.mask);
  r.dX = dY * h.W + adapter;
  return r;
}

// ---- one forward and backward of a model, and what it leaves

// The 16-bit tensor `h` widened (its storage read through a float view: 2 values a float).
Mat download_half(Backend<float>& backend, const HalfTensor& h, BasePrecision format) {
  const std::vector<std::uint16_t> bits = download_half_bits(backend, h);
  Mat r(h.rows(), h.cols());
  for (Index i = 0; i < r.size(); ++i) r.data()[i] = half_bits::half_to_float(bits[std::size_t(i)], format);
  return r;
}

// A 16-bit buffer on `backend` holding `values` rounded to nearest in `format`.
HalfBuffer upload_half(Backend<float>& backend, const Mat& values, BasePrecision format) {
  std::vector<std::uint16_t> bits(std::size_t(values.size()));
  for (Index i = 0; i < values.size(); ++i) {
    bits[std::size_t(i)] = half_bits::round_float(float(values.data()[i]), format, HalfRounding::nearest, 0.0f);
  }
  return upload_half_bits(backend, bits, values.rows(), values.cols());
}

struct Observed {
  HostMatrix<float> out;
  std::vector<bool> native;          // whether the layer took the 16-bit activations itself
  std::vector<HostMatrix<float>> Y;  // fp32 output after the activation (layers the model converts for)
  std::vector<Mat> H;                // 16-bit output, widened
  std::vector<HostLayer> layers;     // the values (and dropout masks) the step ran with
  std::vector<HostMatrix<float>> dA, dB, db, dX;  // dX: of layers above the first that the model converts for
  std::vector<Mat> G;                // a native layer's own 16-bit dX, widened (a layer run alone), else empty
};

// Which layers take the model's 16-bit activations themselves (asked again in the format they
// were asked in when the model set it).
std::vector<bool> native_layers(Model<float>& model) {
  std::vector<bool> native;
  for (std::size_t i = 0; i < model.size(); ++i) {
    native.push_back(model.activation_format() != BasePrecision::fp32 &&
                     model.layer(i).take_half_activations(model.activation_format()));
  }
  return native;
}

// forward(x), what the layers hold, then backward(dy) when dy is given.
Observed run_step(Model<float>& model, const HostMatrix<float>& x, const HostMatrix<float>* dy) {
  Backend<float>& backend = model.backend();
  const BasePrecision format = model.activation_format();
  Observed obs;
  obs.native = native_layers(model);
  Tensor<float> X = to_backend<float>(backend, x, "X");
  obs.out = to_host(backend, model.forward(X));
  for (std::size_t i = 0; i < model.size(); ++i) {
    if (obs.native[i]) {
      obs.Y.emplace_back();
      obs.H.push_back(download_half(backend, model.layer(i).mutable_half_output(), format));
    } else {
      obs.Y.push_back(to_host(backend, model.layer(i).output()));
      obs.H.push_back(format == BasePrecision::fp32 ? wide(obs.Y.back()) : rounded(obs.Y.back(), format));
    }
  }
  obs.layers = host_layers(model);
  if (dy == nullptr) return obs;
  Tensor<float> dY = to_backend<float>(backend, *dy, "dY");
  model.backward(dY);
  for (std::size_t i = 0; i < model.size(); ++i) {
    LoraLinear<float>& l = model.lora(i);
    obs.dA.push_back(to_host(backend, l.dA()));
    obs.dB.push_back(to_host(backend, l.dB()));
    obs.db.push_back(obs.layers[i].bias_trains ? to_host(backend, l.db()) : HostMatrix<float>());
    obs.dX.push_back(i > 0 && !obs.native[i] ? to_host(backend, l.dX()) : HostMatrix<float>());
  }
  return obs;
}

// ---- the three checks (see the top of the file)

constexpr double kFp32Accuracy = 1e-5;

void check_chained(const Observed& obs, const HostMatrix<float>& x, const HostMatrix<float>& dy, BasePrecision format,
                   const std::string& what) {
  const std::size_t L = obs.layers.size();
  Mat X = rounded(x, format);
  double worst_y = 0;
  for (std::size_t l = 0; l < L; ++l) {
    REQUIRE(!obs.native[l]);
    const double e = max_rel(wide(obs.Y[l]), forward_math(obs.layers[l], X).Y);
    INFO(what << ": layer " << l << " Y");
    CHECK(e <= kFp32Accuracy);
    worst_y = std::max(worst_y, e);
    X = obs.H[l];
  }
  // The model's output is the last layer's output rounded and widened, bit for bit.
  Index differ = 0;
  for (Index i = 0; i < obs.out.size(); ++i) differ += double(obs.out.data()[i]) != obs.H[L - 1].data()[i];
  INFO(what);
  CHECK(differ == 0);

  Mat G = rounded(dy, format);
  double worst_grad = 0;
  for (std::size_t l = L; l-- > 0;) {
    const HostLayer& h = obs.layers[l];
    const Mat input = l > 0 ? obs.H[l - 1] : rounded(x, format);
    const Mat dY = h.relu ? Mat(G.cwiseProduct(positive(obs.H[l]))) : G;
    const LayerBackward bw = backward_math(h, input, dY);
    const double e_a = max_rel(wide(obs.dA[l]), bw.dA), e_b = max_rel(wide(obs.dB[l]), bw.dB);
    const double e_bias = h.bias_trains ? max_rel(wide(obs.db[l]), bw.db) : 0.0;
    INFO(what << ": layer " << l << ": dA " << e_a << ", dB " << e_b << ", db " << e_bias);
    CHECK(e_a <= kFp32Accuracy);
    CHECK(e_b <= kFp32Accuracy);
    CHECK(e_bias <= kFp32Accuracy);
    worst_grad = std::max({worst_grad, e_a, e_b, e_bias});
    if (l == 0) break;
    const double e_x = max_rel(wide(obs.dX[l]), bw.dX);
    CHECK(e_x <= kFp32Accuracy);
    worst_grad = std::max(worst_grad, e_x);
    G = rounded(obs.dX[l], format);
  }
  MESSAGE(what << ", chained: worst Y " << worst_y << ", worst gradient " << worst_grad
               << " (of max |value|); output bits differing " << differ);
}

struct Definition {
  Mat out;
  std::vector<Mat> dA, dB, db;
};

Definition definition(const std::vector<HostLayer>& layers, const HostMatrix<float>& x, const HostMatrix<float>& dy,
                      BasePrecision format) {
  const std::size_t L = layers.size();
  std::vector<Mat> H{rounded(x, format)};
  for (const HostLayer& h : layers) H.push_back(rounded(forward_math(h, H.back()).Y, format));
  Definition def;
  def.out = H.back();
  def.dA.resize(L), def.dB.resize(L), def.db.resize(L);
  Mat G = rounded(dy, format);
  for (std::size_t l = L; l-- > 0;) {
    const Mat dY = layers[l].relu ? Mat(G.cwiseProduct(positive(H[l + 1]))) : G;
    LayerBackward bw = backward_math(layers[l], H[l], dY);
    def.dA[l] = bw.dA, def.dB[l] = bw.dB, def.db[l] = bw.db;
    if (l > 0) G = rounded(bw.dX, format);
  }
  return def;
}

void check_definition(const Observed& obs, const Definition& def, BasePrecision format, const std::string& what) {
  const double u = half_unit_roundoff(format);
  const Mat out = wide(obs.out);
  const double scale = max_abs(def.out);
  double worst = 0;
  Index moved = 0;  // entries beyond fp32 accuracy: a rounding that went the other way, here or below
  for (Index i = 0; i < out.size(); ++i) {
    const double diff = std::fabs(out.data()[i] - def.out.data()[i]);
    if (diff > kFp32Accuracy * scale) ++moved;
    worst = std::max(worst, diff / (2 * spacing(def.out.data()[i], format) + kFp32Accuracy * scale));
  }
  INFO(what);
  CHECK(worst <= 1.0);
  double worst_grad = 0;
  for (std::size_t l = 0; l < obs.layers.size(); ++l) {
    const double e_a = frobenius_rel(wide(obs.dA[l]), def.dA[l]), e_b = frobenius_rel(wide(obs.dB[l]), def.dB[l]);
    const double e_bias = obs.layers[l].bias_trains ? frobenius_rel(wide(obs.db[l]), def.db[l]) : 0.0;
    INFO("layer " << l << ": dA " << e_a << ", dB " << e_b << ", db " << e_bias);
    CHECK(e_a <= u);
    CHECK(e_b <= u);
    CHECK(e_bias <= u);
    worst_grad = std::max({worst_grad, e_a, e_b, e_bias});
  }
  MESSAGE(what << ", whole definition: output within " << worst << " of its 2-ulp bound (" << moved << " of "
               << out.size() << " entries beyond fp32 accuracy); worst gradient " << worst_grad << " (u = " << u
               << ")");
}

// Every entry of `got` within `bound` of `center` (plus 1e-7 of center's largest entry, for fp32
// additions the bounds leave out). Returns the worst |got - center| / bound. The bound must also
// be narrow, `width` of the largest entry at most, or the check would say little.
double check_within(const std::string& what, const Mat& got, const Mat& center, const Mat& bound, double width) {
  const double floor = 1e-7 * max_abs(center);
  double worst = 0;
  Index beyond = 0, first = -1;
  for (Index i = 0; i < got.size(); ++i) {
    const double ratio = std::fabs(got.data()[i] - center.data()[i]) / (bound.data()[i] + floor);
    worst = std::max(worst, ratio);
    if (ratio > 1 && beyond++ == 0) first = i;
  }
  INFO(what << ": " << beyond << " of " << got.size() << " entries beyond the bound; the first, entry " << first
            << ": " << (first >= 0 ? got.data()[first] : 0.0) << " against " << (first >= 0 ? center.data()[first] : 0.0)
            << " +- " << (first >= 0 ? bound.data()[first] : 0.0));
  CHECK(beyond == 0);
  CHECK(max_abs(bound) <= width * max_abs(center));
  return worst;
}

// The products' accuracy the bounds allow, relative to the sum of the terms' magnitudes: fp32
// accumulation over k <= 1024 terms (k 2^-24 = 2^-14), or tensor cores on fp32 operands split
// into bf16 terms (each split exact to 2^-16 of the operand, the dropped lo x lo term 2^-16).
constexpr double kProduct = 0x1.0p-14;

// The bounded check. Each layer's math is taken on its own 16-bit input (the model's, read back),
// so only this layer's errors count. Forward: P = X W^T + b and U = D(X) A^T to kProduct of
// |X||W|^T + |b| and |D(X)||A|^T; T = s U B^T to s (kProduct |U||B|^T + its U's error |B|^T), then
// T + b rounded to the format (u |T + b|: the native layer's first rounding, which takes the bias
// with the adapter's term); the sum through f (1-Lipschitz) and rounded: half a spacing at |f(Y)|
// + the error so far. That is a few u of |Y| at most: the bound may be 8 u of the largest entry
// wide.
// Backward, from the top down: dY_l's error E (0 at the top, where G_L = round(dY) and f'(H_L) are
// known exactly) travels through each product as E times the other factor's magnitude, plus
// kProduct of the terms; dX's adapter part may be rounded too (u), and G = round(dX) adds half a
// spacing. f' is read from the layer's own H, as the model reads it, so both sides mask the same
// entries. At the top the gradients' bound is kProduct-sized (8 u wide at most). Below, E is about
// u |G| per entry and sums of n terms of it over |terms|, which random signs make many times |sum|
// (on wide layers wider than the largest entry: the elementwise check there finds only gross
// errors), so the gradients below the top must also lie within 2 u of the center in Frobenius
// norm, which their actual errors (the roundings of G, ~u/3 each, of random sign) keep.
// obs.G, where given, holds a layer's own 16-bit dX (a layer run alone), bounded as dX is.
void check_bounds(const Observed& obs, const HostMatrix<float>& x, const HostMatrix<float>* dy, BasePrecision format,
                  const std::string& what) {
  const double u = half_unit_roundoff(format);
  const std::size_t L = obs.layers.size();
  Mat X = rounded(x, format);
  double worst = 0, worst_frobenius = 0;
  for (std::size_t l = 0; l < L; ++l) {
    const HostLayer& h = obs.layers[l];
    const LayerForward fw = forward_math(h, X);
    Mat aP = X.cwiseAbs() * h.W.cwiseAbs().transpose();
    aP.rowwise() += h.b.cwiseAbs().row(0);
    const Mat aU = fw.Xd.cwiseAbs() * h.A.cwiseAbs().transpose();
    Mat e_T = Mat::Zero(fw.T.rows(), fw.T.cols());
    if (!h.merged) e_T = h.s * kProduct * (aU + fw.U.cwiseAbs()) * h.B.cwiseAbs().transpose();
    Mat T_and_b = fw.T;
    T_and_b.rowwise() += h.b.row(0);
    e_T += u * (T_and_b.cwiseAbs() + e_T);
    // The native layer's base product may itself be rounded before the adapter's term is added
    // (cuBLAS adds a 16-bit C after rounding the product in some of its kernels): u |X W^T| more.
    const Mat e_Y = kProduct * aP + e_T + u * aP + 0x1.0p-23 * (fw.P.cwiseAbs() + fw.T.cwiseAbs());
    const Mat bound = e_Y + half_spacing(fw.Y, e_Y, format);
    worst = std::max(worst, check_within(what + ": layer " + std::to_string(l) + " H", obs.H[l], fw.Y, bound, 8 * u));
    X = obs.H[l];
  }
  Index differ = 0;
  for (Index i = 0; i < obs.out.size(); ++i) differ += double(obs.out.data()[i]) != obs.H[L - 1].data()[i];
  INFO(what << ": output is the last layer's 16-bit output");
  CHECK(differ == 0);
  if (dy == nullptr) {
    MESSAGE(what << ", bounded: forward within " << worst << " of its bound");
    return;
  }

  Mat D = rounded(*dy, format);
  if (obs.layers[L - 1].relu) D = D.cwiseProduct(positive(obs.H[L - 1]));
  Mat E = Mat::Zero(D.rows(), D.cols());
  for (std::size_t l = L; l-- > 0;) {
    const HostLayer& h = obs.layers[l];
    const Mat input = l > 0 ? obs.H[l - 1] : rounded(x, format);
    const Mat Xd = h.mask.size() != 0 ? Mat(input.cwiseProduct(h.mask)) : input;
    const Mat aXd = Xd.cwiseAbs();
    const Mat U = Xd * h.A.transpose();
    const Mat aU = U.cwiseAbs() + kProduct * (aXd * h.A.cwiseAbs().transpose());  // |U'|, U' as the layer has it
    const LayerBackward bw = backward_math(h, input, D);
    const Mat aD = D.cwiseAbs(), aB = h.B.cwiseAbs(), aA = h.A.cwiseAbs();
    const Mat e_dU = h.s * (E * aB + kProduct * aD * aB);
    const Mat a_dU = bw.dU.cwiseAbs() + e_dU;
    const Mat e_dB = h.s * (E.transpose() * aU + kProduct * aD.transpose() * aU + kProduct * aD.transpose() * U.cwiseAbs());
    const Mat e_dA = e_dU.transpose() * aXd + kProduct * a_dU.transpose() * aXd;
    const std::string layer = what + ": layer " + std::to_string(l);
    const bool top = l + 1 == L;
    const double width = top ? 8 * u : std::numeric_limits<double>::infinity();
    worst = std::max(worst, check_within(layer + " dA", wide(obs.dA[l]), bw.dA, e_dA, width));
    worst = std::max(worst, check_within(layer + " dB", wide(obs.dB[l]), bw.dB, e_dB, width));
    std::vector<double> frobenius{frobenius_rel(wide(obs.dA[l]), bw.dA), frobenius_rel(wide(obs.dB[l]), bw.dB)};
    if (h.bias_trains) {
      const Mat e_db = E.colwise().sum() + kProduct * aD.colwise().sum();
      worst = std::max(worst, check_within(layer + " db", wide(obs.db[l]), bw.db, e_db, width));
      frobenius.push_back(frobenius_rel(wide(obs.db[l]), bw.db));
    }
    for (const double e : frobenius) {
      INFO(layer << ": gradient's Frobenius distance to the center " << e);
      CHECK(e <= 2 * u);
      worst_frobenius = std::max(worst_frobenius, e);
    }
    const bool own_dX = obs.G.size() > l && obs.G[l].size() != 0;
    if (l == 0 && !own_dX) break;
    Mat V = bw.dU * h.A, e_V = e_dU * aA + kProduct * a_dU * aA;
    if (h.mask.size() != 0) V = V.cwiseProduct(h.mask), e_V = e_V.cwiseProduct(h.mask.cwiseAbs());
    e_V += u * (V.cwiseAbs() + e_V);
    // As in the forward, dY W may be rounded before dU A is added: u |dY| |W| more.
    const Mat e_dX = E * h.W.cwiseAbs() + (kProduct + u) * aD * h.W.cwiseAbs() + e_V + 0x1.0p-23 * bw.dX.cwiseAbs();
    E = e_dX + half_spacing(bw.dX, e_dX, format);
    if (own_dX) worst = std::max(worst, check_within(layer + " dX", obs.G[l], bw.dX, E, width));
    if (l == 0) break;
    D = bw.dX;
    if (obs.layers[l - 1].relu) {
      const Mat below = positive(obs.H[l - 1]);
      D = D.cwiseProduct(below);
      E = E.cwiseProduct(below);
    }
  }
  MESSAGE(what << ", bounded: every value within " << worst << " of its bound; gradients within " << worst_frobenius
               << " of the center (Frobenius, u = " << u << ")");
}

// ---- a 3-layer model for the CPU: three base formats, a trainable and a frozen bias, and the
// last layer (16 x 16, fp32 base) CpuTinyLoraLinear under LayerChoice::fastest.

std::vector<LayerSpec> mixed_specs(BasePrecision first, BasePrecision second, BasePrecision third) {
  return {LayerSpec{.in = 24, .out = 40, .rank = 4, .base = first, .f = Activation::relu, .bias = BiasMode::trainable},
          LayerSpec{.in = 40, .out = 16, .rank = 8, .base = second, .f = Activation::relu, .bias = BiasMode::frozen},
          LayerSpec{.in = 16, .out = 16, .rank = 4, .base = third, .f = Activation::identity}};
}

// A teacher for the regression: the same layers with their adapters set, which a student of the
// same frozen bases (B = 0) can learn.
HostMatrix<float> teacher_targets(const std::vector<LayerSpec>& specs, const HostMatrix<float>& x, std::uint64_t seed) {
  auto backend = cpu();
  Model<float> teacher(backend);
  std::mt19937_64 gen(seed);
  for (std::size_t i = 0; i < specs.size(); ++i) {
    LoraLinear<float>& layer = teacher.add(config_of(specs[i], i), specs[i].f);
    layer.set_B(normal_matrix<float>(specs[i].out, specs[i].rank, gen, 0.5 / std::sqrt(double(specs[i].rank))));
  }
  teacher.set_training(false);  // no dropout in the targets
  return teacher.predict(x);
}

// The losses of `steps` Trainer steps (Adam) of LoRA on the teacher's targets, the student's
// activations in `format`.
std::vector<double> train_losses(std::shared_ptr<Backend<float>> backend, LayerChoice choice,
                                 const std::vector<LayerSpec>& specs, BasePrecision format, const HostMatrix<float>& x,
                                 const HostMatrix<float>& y, int steps, double lr = 1e-2) {
  Model<float> model(backend, choice);
  for (std::size_t i = 0; i < specs.size(); ++i) model.add(config_of(specs[i], i), specs[i].f);
  model.set_activation_format(format);
  Trainer<float> trainer(model, TrainerConfig{.method = TrainingMethod::lora, .adam = {.lr = lr}});
  Tensor<float> X = to_backend<float>(*backend, x, "X"), Y = to_backend<float>(*backend, y, "Y");
  std::vector<double> losses;
  for (int step = 0; step < steps; ++step) {
    trainer.step(X, Y);
    losses.push_back(double(trainer.loss()));
  }
  return losses;
}

// A backend that counts the tensors allocated through it and passes everything to `inner`.
class CountingBackend final : public Backend<float> {
 public:
  explicit CountingBackend(std::shared_ptr<Backend<float>> inner) : inner_(std::move(inner)) {}
  long allocations() const { return allocations_; }

  Device device() const override { return inner_->device(); }
  Backend<float>& underlying() override { return inner_->underlying(); }
  std::string description() const override { return "counting " + inner_->description(); }
  void set_math_mode(MathMode mode) override { inner_->set_math_mode(mode); }
  MathMode math_mode() const override { return inner_->math_mode(); }
  Tensor<float> allocate(Index rows, Index cols) override {
    ++allocations_;
    return inner_->allocate(rows, cols);
  }
  void upload(const float* host, Tensor<float>& dst) override { inner_->upload(host, dst); }
  void download(const Tensor<float>& src, float* host) override { inner_->download(src, host); }
  void copy(const Tensor<float>& src, Tensor<float>& dst) override { inner_->copy(src, dst); }
  void fill(Tensor<float>& x, float value) override { inner_->fill(x, value); }
  void synchronize() override { inner_->synchronize(); }
  void gemm(Trans trans_a, Trans trans_b, float alpha, const Tensor<float>& A, const Tensor<float>& B, float beta,
            Tensor<float>& C) override {
    inner_->gemm(trans_a, trans_b, alpha, A, B, beta, C);
  }
  void gemm_bias_activation(Trans trans_a, Trans trans_b, float alpha, const Tensor<float>& A, const Tensor<float>& B,
                            float beta, const Tensor<float>* b, Activation f, Tensor<float>& C) override {
    inner_->gemm_bias_activation(trans_a, trans_b, alpha, A, B, beta, b, f, C);
  }
  void add_row_vector(const Tensor<float>& b, Tensor<float>& Y) override { inner_->add_row_vector(b, Y); }
  void column_sums(const Tensor<float>& dY, float beta, Tensor<float>& db) override {
    inner_->column_sums(dY, beta, db);
  }
  void multiply(const Tensor<float>& a, const Tensor<float>& b, Tensor<float>& out) override {
    inner_->multiply(a, b, out);
  }
  void activation_forward(Activation f, const Tensor<float>& Y, Tensor<float>& Z) override {
    inner_->activation_forward(f, Y, Z);
  }
  void activation_backward(Activation f, const Tensor<float>& Y, const Tensor<float>& dZ, Tensor<float>& dY) override {
    inner_->activation_backward(f, Y, dZ, dY);
  }
  float max_abs(const Tensor<float>& x) override { return inner_->max_abs(x); }
  void mse(const Tensor<float>& Y, const Tensor<float>& target, Tensor<float>& dY, Tensor<float>& loss) override {
    inner_->mse(Y, target, dY, loss);
  }
  void random_uniform(RngKey key, float low, float high, Tensor<float>& x) override {
    inner_->random_uniform(key, low, high, x);
  }
  void random_normal(RngKey key, float mean, float stddev, Tensor<float>& x) override {
    inner_->random_normal(key, mean, stddev, x);
  }
  void dropout_mask(RngKey key, float p, Tensor<float>& mask) override { inner_->dropout_mask(key, p, mask); }
  bool begin_recording() override { return inner_->begin_recording(); }
  std::uint64_t end_recording() override { return inner_->end_recording(); }
  bool replay(std::uint64_t id, const std::function<void()>& refresh) override { return inner_->replay(id, refresh); }
  void drop_recording() override { inner_->drop_recording(); }
  void set_host_wait_check(const void* owner, std::function<void()> check) override {
    inner_->set_host_wait_check(owner, std::move(check));
  }

 private:
  std::shared_ptr<Backend<float>> inner_;
  long allocations_ = 0;
};

// Three eager Trainer steps with `format` activations; the allocations through the backend during
// the first and the third.
std::pair<long, long> allocations_of_steps(std::shared_ptr<Backend<float>> inner, const std::vector<LayerSpec>& specs,
                                           BasePrecision format, Index n) {
  auto counting = std::make_shared<CountingBackend>(std::move(inner));
  std::mt19937_64 gen(5);
  const Draw d = draw(specs, 6);
  Model<float> model = build(counting, LayerChoice::fastest, specs, d);
  model.set_activation_format(format);
  TrainerConfig config{.method = TrainingMethod::lora, .adam = {.lr = 1e-3}};
  config.use_graphs = false;
  Trainer<float> trainer(model, config);
  Tensor<float> X = to_backend<float>(*counting, normal_matrix<float>(n, specs.front().in, gen), "X");
  Tensor<float> Y = to_backend<float>(*counting, normal_matrix<float>(n, specs.back().out, gen), "Y");
  const long before = counting->allocations();
  trainer.step(X, Y);
  const long first = counting->allocations() - before;
  trainer.step(X, Y);
  const long warm = counting->allocations();
  trainer.step(X, Y);
  const long third = counting->allocations() - warm;
  CHECK(std::isfinite(double(trainer.loss())));
  return {first, third};
}

}  // namespace

TEST_CASE("16-bit activations: CPU forward, dA, dB, db and dX follow the definition (bf16, fp16 bases and fp32 mixed)") {
  auto backend = cpu();
  const Index n = 48;
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    for (const LayerChoice choice : {LayerChoice::reference, LayerChoice::fastest}) {
      const std::vector<LayerSpec> specs = mixed_specs(BasePrecision::bf16, BasePrecision::fp16, BasePrecision::fp32);
      const Draw d = draw(specs, 7);
      std::mt19937_64 gen(8);
      const HostMatrix<float> x = normal_matrix<float>(n, specs.front().in, gen);
      const HostMatrix<float> dy = normal_matrix<float>(n, specs.back().out, gen, 0.05);  // as an MSE's 2 (Y - T) / size
      Model<float> model = build(backend, choice, specs, d);
      model.set_activation_format(format);
      CHECK(model.activation_format() == format);
      if (choice == LayerChoice::fastest) CHECK(std::string(model.layer(2).implementation()) == "cpu_tiny");
      const Observed obs = run_step(model, x, &dy);
      for (std::size_t i = 0; i < model.size(); ++i) CHECK(!obs.native[i]);  // no CPU layer takes them itself
      const std::string what = std::string(name_of(format)) + (choice == LayerChoice::fastest ? " fastest" : " reference");
      // Every output entry is a value of the format.
      CHECK((wide(obs.out).array() == rounded(obs.out, format).array()).all());
      check_chained(obs, x, dy, format, what);
      check_bounds(obs, x, &dy, format, what);
      check_definition(obs, definition(obs.layers, x, dy, format), format, what);
      // The format changes what the model computes: fp32 activations give another output.
      model.set_activation_format(BasePrecision::fp32);
      Tensor<float> X = to_backend<float>(*backend, x, "X");
      const HostMatrix<float> fp32_out = to_host(*backend, model.forward(X));
      CHECK(max_rel(wide(fp32_out), wide(obs.out)) > 0);
      CHECK(max_rel(wide(fp32_out), wide(obs.out)) <= 8 * half_unit_roundoff(format));
    }
  }
}

TEST_CASE("16-bit activations: training with bf16 or fp16 activations ends within 5% of the fp32 loss") {
  // The regression's targets come from a teacher on the same frozen bases, so LoRA can fit them and
  // the loss falls by a large factor. Rounding the activations moves each output by ~u of itself
  // (and the gradients by as much): the 16-bit losses must follow the fp32 ones within 5% at every
  // step (u = 0.4% for bf16), far less than the fall, and the fall must be at least tenfold.
  auto backend = cpu();
  const std::vector<LayerSpec> specs = mixed_specs(BasePrecision::bf16, BasePrecision::fp16, BasePrecision::fp32);
  std::mt19937_64 gen(31);
  const HostMatrix<float> x = normal_matrix<float>(64, specs.front().in, gen);
  const HostMatrix<float> y = teacher_targets(specs, x, 32);
  const int steps = 60;
  const std::vector<double> fp32 = train_losses(backend, LayerChoice::fastest, specs, BasePrecision::fp32, x, y, steps);
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    const std::vector<double> half = train_losses(backend, LayerChoice::fastest, specs, format, x, y, steps);
    double worst = 0;
    for (int i = 0; i < steps; ++i) worst = std::max(worst, std::fabs(half[i] - fp32[i]) / fp32[i]);
    MESSAGE(name_of(format) << ": loss " << half.front() << " -> " << half.back() << " (fp32 " << fp32.front() << " -> "
                            << fp32.back() << "); largest relative difference to fp32 over the steps " << worst);
    CHECK(half.back() < 0.1 * half.front());
    CHECK(std::fabs(half.back() - fp32.back()) <= 0.05 * fp32.back());
    CHECK(worst <= 0.05);
  }
}

TEST_CASE("16-bit activations: refused for a double model and around tanh or GELU, the model unchanged") {
  // A double model: ConfigError, still fp32.
  {
    Model<double> model(make_backend<double>(Device::cpu));
    model.add(LoraConfig{.in_features = 8, .out_features = 6, .rank = 2}, Activation::relu);
    for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
      CHECK_THROWS_AS(model.set_activation_format(format), ConfigError);
      CHECK(model.activation_format() == BasePrecision::fp32);
    }
    model.set_activation_format(BasePrecision::fp32);  // fp32 is what it has: accepted
    CHECK(model.activation_format() == BasePrecision::fp32);
  }
  auto backend = cpu();
  std::mt19937_64 gen(41);
  const HostMatrix<float> x = normal_matrix<float>(12, 24, gen);
  // tanh (or GELU) after layer 1: refused, naming the layer; the model computes as before.
  for (const Activation bad : {Activation::tanh, Activation::gelu}) {
    std::vector<LayerSpec> specs = mixed_specs(BasePrecision::bf16, BasePrecision::fp32, BasePrecision::fp32);
    specs[1].f = bad;
    const Draw d = draw(specs, 42);
    Model<float> model = build(backend, LayerChoice::fastest, specs, d);
    Model<float> twin = build(backend, LayerChoice::fastest, specs, d);
    const std::string message = what_of([&] { model.set_activation_format(BasePrecision::bf16); });
    MESSAGE(message);
    CHECK_THROWS_AS(model.set_activation_format(BasePrecision::fp16), ConfigError);
    CHECK(message.find("layer 1") != std::string::npos);
    CHECK(model.activation_format() == BasePrecision::fp32);
    const HostMatrix<float> got = model.predict(x), want = twin.predict(x);
    CHECK((got.array() == want.array()).all());
  }
  // After set_activation_format, add() of a layer followed by tanh or GELU is refused and the
  // model keeps its layers; one followed by ReLU or the identity is taken.
  {
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 24, .out_features = 16, .rank = 4, .seed = 1}, Activation::relu);
    model.set_activation_format(BasePrecision::bf16);
    CHECK_THROWS_AS(model.add(LoraConfig{.in_features = 16, .out_features = 8, .rank = 2}, Activation::gelu), ConfigError);
    CHECK_THROWS_AS(model.add(LoraConfig{.in_features = 16, .out_features = 8, .rank = 2}, Activation::tanh), ConfigError);
    CHECK(model.size() == 1);
    model.add(LoraConfig{.in_features = 16, .out_features = 8, .rank = 2, .seed = 2}, Activation::relu);
    model.add(LoraConfig{.in_features = 8, .out_features = 4, .rank = 2, .seed = 3}, Activation::identity);
    CHECK(model.size() == 3);
    const HostMatrix<float> y = model.predict(x);
    CHECK(y.cols() == 4);
    CHECK((wide(y).array() == rounded(y, BasePrecision::bf16).array()).all());
  }
}

TEST_CASE("16-bit activations: set_activation_format(fp32) gives back a fresh fp32 model's results bit for bit") {
  auto backend = cpu();
  const std::vector<LayerSpec> specs = mixed_specs(BasePrecision::bf16, BasePrecision::fp16, BasePrecision::fp32);
  const Draw d = draw(specs, 51);
  std::mt19937_64 gen(52);
  const HostMatrix<float> x = normal_matrix<float>(32, specs.front().in, gen);
  const HostMatrix<float> dy = normal_matrix<float>(32, specs.back().out, gen, 0.05);
  Model<float> model = build(backend, LayerChoice::fastest, specs, d);
  Model<float> fresh = build(backend, LayerChoice::fastest, specs, d);
  model.set_activation_format(BasePrecision::bf16);
  const Observed half = run_step(model, x, &dy);
  // A forward in one format and a backward in another is refused: the buffers are not the same.
  {
    Tensor<float> X = to_backend<float>(*backend, x, "X"), dY = to_backend<float>(*backend, dy, "dY");
    model.forward(X);
    model.set_activation_format(BasePrecision::fp16);
    CHECK_THROWS_AS(model.backward(dY), ConfigError);
  }
  model.set_activation_format(BasePrecision::fp32);
  CHECK(model.activation_format() == BasePrecision::fp32);
  const Observed back = run_step(model, x, &dy);
  const Observed want = run_step(fresh, x, &dy);
  CHECK((back.out.array() == want.out.array()).all());
  CHECK((half.out.array() != want.out.array()).any());  // the bf16 step did compute something else
  for (std::size_t i = 0; i < model.size(); ++i) {
    INFO("layer " << i);
    CHECK((back.dA[i].array() == want.dA[i].array()).all());
    CHECK((back.dB[i].array() == want.dB[i].array()).all());
    CHECK((back.db[i].array() == want.db[i].array()).all());
    CHECK((back.Y[i].array() == want.Y[i].array()).all());
  }
}

TEST_CASE("16-bit activations: a steady training step allocates nothing through the backend (CPU)") {
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    const auto [first, third] = allocations_of_steps(
        cpu(), mixed_specs(BasePrecision::bf16, BasePrecision::fp16, BasePrecision::fp32), format, 40);
    MESSAGE(name_of(format) << " activations: " << first << " tensors allocated in the first step, " << third
                            << " in the third");
    CHECK(first > 0);  // the count sees the buffers sized on the first step
    CHECK(third == 0);
  }
}

// ---- CUDA

namespace {

std::vector<LayerSpec> gpu_specs(Index in, Index hidden1, Index hidden2, Index out, Index rank, BasePrecision base) {
  return {LayerSpec{.in = in, .out = hidden1, .rank = rank, .base = base, .f = Activation::relu, .bias = BiasMode::trainable},
          LayerSpec{.in = hidden1, .out = hidden2, .rank = rank, .base = base, .f = Activation::relu, .bias = BiasMode::frozen},
          LayerSpec{.in = hidden2, .out = out, .rank = rank / 2, .base = base, .f = Activation::identity}};
}

struct GpuCase {
  const char* name;
  Index n;
  std::vector<LayerSpec> (*specs)(BasePrecision);
};

std::vector<LayerSpec> large_specs(BasePrecision base) { return gpu_specs(512, 512, 256, 128, 16, base); }
// Rows and widths off every multiple of 8: the kernels' tails.
std::vector<LayerSpec> tail_specs(BasePrecision base) { return gpu_specs(20, 36, 20, 36, 8, base); }

}  // namespace

TEST_CASE("16-bit activations: CUDA LayerChoice::reference equals the CPU (bf16 and fp16)") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  auto gpu = make_backend<float>(Device::cuda), host = cpu();
  const Index n = 48;
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    // On CUDA a 16-bit base rounds its fp32 operand (X, dY) to W's format: exact for activations
    // of the format, or bf16 ones into an fp16 base, so those are the bases taken here.
    const std::vector<LayerSpec> specs = mixed_specs(format, BasePrecision::fp16, BasePrecision::fp32);
    const Draw d = draw(specs, 61);
    std::mt19937_64 gen(62);
    const HostMatrix<float> x = normal_matrix<float>(n, specs.front().in, gen);
    const HostMatrix<float> dy = normal_matrix<float>(n, specs.back().out, gen, 0.05);
    Model<float> on_gpu = build(gpu, LayerChoice::reference, specs, d), on_cpu = build(host, LayerChoice::reference, specs, d);
    on_gpu.set_activation_format(format);
    on_cpu.set_activation_format(format);
    const Observed g = run_step(on_gpu, x, &dy), c = run_step(on_cpu, x, &dy);
    const std::string what = std::string("cuda reference ") + name_of(format);
    check_chained(g, x, dy, format, what);
    check_definition(g, definition(g.layers, x, dy, format), format, what);
    // The CPU's: within two ulps of each output entry (a rounding may flip), gradients within u.
    double worst = 0;
    for (Index i = 0; i < g.out.size(); ++i) {
      const double diff = std::fabs(double(g.out.data()[i]) - double(c.out.data()[i]));
      worst = std::max(worst, diff / (2 * spacing(c.out.data()[i], format) + kFp32Accuracy * max_abs(wide(c.out))));
    }
    CHECK(worst <= 1.0);
    for (std::size_t l = 0; l < specs.size(); ++l) {
      INFO("layer " << l);
      CHECK(frobenius_rel(wide(g.dA[l]), wide(c.dA[l])) <= half_unit_roundoff(format));
      CHECK(frobenius_rel(wide(g.dB[l]), wide(c.dB[l])) <= half_unit_roundoff(format));
    }
    MESSAGE(what << " against the CPU: output within " << worst << " of its 2-ulp bound");
  }
}

TEST_CASE("16-bit activations: CUDA native layers (cuda_half) stay within their roundings' bounds of the definition") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  auto gpu = make_backend<float>(Device::cuda);
  for (const GpuCase& shape : {GpuCase{"n 256, 512 -> 512 -> 256 -> 128", 256, large_specs},
                               GpuCase{"n 37, 20 -> 36 -> 20 -> 36", 37, tail_specs}}) {
    for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
      const std::string what = std::string(shape.name) + ", " + name_of(format);
      const std::vector<LayerSpec> specs = shape.specs(format);
      const Draw d = draw(specs, 71);
      std::mt19937_64 gen(72);
      const HostMatrix<float> x = normal_matrix<float>(shape.n, specs.front().in, gen);
      const HostMatrix<float> dy = normal_matrix<float>(shape.n, specs.back().out, gen, 0.05);
      Model<float> fast = build(gpu, LayerChoice::fastest, specs, d), ref = build(gpu, LayerChoice::reference, specs, d);
      fast.set_activation_format(format);
      ref.set_activation_format(format);
      const Observed f = run_step(fast, x, &dy), r = run_step(ref, x, &dy);
      // A bf16 base takes bf16 activations itself (CudaHalfLoraLinear); an fp16 base's layer
      // (CudaAdapterLoraLinear) leaves the conversions to the model.
      for (std::size_t i = 0; i < specs.size(); ++i) {
        INFO(what << ": layer " << i << " is " << std::string(fast.layer(i).implementation()));
        CHECK((std::string(fast.layer(i).implementation()) == "cuda_half") == (format == BasePrecision::bf16));
        CHECK(f.native[i] == (format == BasePrecision::bf16));
      }
      check_bounds(f, x, &dy, format, what + " fastest");
      check_chained(r, x, dy, format, what + " reference");
      // Against the reference model: each layer's output differs by at most u |T + b| + 1 ulp, and
      // what differs below travels up about unchanged (|W| ~ 1/sqrt(k) per entry, ReLU
      // 1-Lipschitz): 3 L u of the largest entry. The gradients can differ much more entry by
      // entry, where an output near 0 falls on the other side of ReLU in one model (the bounded
      // check above holds each model to its own masks): the top layer's (dY the same in both, its
      // input within a few u) within 16 u of the largest entry, and every layer's within a
      // quarter in Frobenius norm, which still finds a wrong term, mask or scale.
      const double u = half_unit_roundoff(format), L = double(specs.size());
      const double e_out = max_rel(wide(f.out), wide(r.out));
      CHECK(e_out <= 3 * L * u);
      std::string gradients;
      for (std::size_t l = 0; l < specs.size(); ++l) {
        std::vector<std::pair<const char*, std::pair<Mat, Mat>>> pairs{{"dA", {wide(f.dA[l]), wide(r.dA[l])}},
                                                                       {"dB", {wide(f.dB[l]), wide(r.dB[l])}}};
        if (specs[l].bias == BiasMode::trainable) pairs.push_back({"db", {wide(f.db[l]), wide(r.db[l])}});
        for (const auto& [name, values] : pairs) {
          const double e_max = max_rel(values.first, values.second), e_frobenius = frobenius_rel(values.first, values.second);
          gradients += " layer " + std::to_string(l) + " " + name + " " + std::to_string(e_max) + " (" +
                       std::to_string(e_frobenius) + ")";
          INFO(what << ": layer " << l << " " << name << ": " << e_max << " of max |value|, " << e_frobenius
                    << " Frobenius");
          CHECK(e_frobenius <= 0.25);
          if (l + 1 == specs.size()) CHECK(e_max <= 16 * u);
        }
      }
      MESSAGE(what << ": fastest against reference: output " << e_out << " of max |value| (u = " << u
                   << "); gradients, of max |value| (Frobenius):" << gradients);
    }
  }
}

TEST_CASE("16-bit activations: CUDA models mixing native and converted layers follow the definition (bf16)") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  // Native layers (bf16 base) below and above layers the model converts for (fp16 and fp32 bases:
  // CudaAdapterLoraLinear, CudaTinyLoraLinear), so that 16-bit outputs and dX pass between the
  // two kinds through the model's buffers in both directions.
  auto gpu = make_backend<float>(Device::cuda);
  const BasePrecision bf16 = BasePrecision::bf16;
  for (const auto& bases : {std::vector<BasePrecision>{bf16, BasePrecision::fp16, BasePrecision::fp32},
                            std::vector<BasePrecision>{BasePrecision::fp32, bf16, bf16},
                            std::vector<BasePrecision>{bf16, BasePrecision::fp32, bf16}}) {
    const std::vector<LayerSpec> specs = mixed_specs(bases[0], bases[1], bases[2]);
    std::string what = "bases";
    for (const BasePrecision base : bases) what += " " + name_of(base);
    const Draw d = draw(specs, 121);
    std::mt19937_64 gen(122);
    const Index n = 48;
    const HostMatrix<float> x = normal_matrix<float>(n, specs.front().in, gen);
    const HostMatrix<float> dy = normal_matrix<float>(n, specs.back().out, gen, 0.05);
    Model<float> fast = build(gpu, LayerChoice::fastest, specs, d), ref = build(gpu, LayerChoice::reference, specs, d);
    fast.set_activation_format(bf16);
    ref.set_activation_format(bf16);
    const Observed f = run_step(fast, x, &dy), r = run_step(ref, x, &dy);
    for (std::size_t i = 0; i < specs.size(); ++i) {
      INFO(what << ": layer " << i << " is " << std::string(fast.layer(i).implementation()));
      CHECK(f.native[i] == (bases[i] == bf16));
    }
    check_bounds(f, x, &dy, bf16, what + " fastest");
    check_chained(r, x, dy, bf16, what + " reference");
    CHECK(max_rel(wide(f.out), wide(r.out)) <= 3 * double(specs.size()) * half_unit_roundoff(bf16));
    // A second step on the same buffers gives the same results (nothing left over from the first).
    const Observed again = run_step(fast, x, &dy);
    CHECK((again.out.array() == f.out.array()).all());
    for (std::size_t i = 0; i < specs.size(); ++i) {
      INFO(what << ": layer " << i);
      CHECK((again.dA[i].array() == f.dA[i].array()).all());
      CHECK((again.dB[i].array() == f.dB[i].array()).all());
    }
  }
}

TEST_CASE("16-bit activations: a CUDA native layer alone: forward_half, dA, dB, db and its 16-bit dX within its roundings") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  // The layer driven through the Layer interface as the model drives it, so that its own dX,
  // which the model passes on without keeping, can be read: every input known exactly, every
  // bound kProduct-sized but for the forward's and dX's roundings (check_bounds).
  // In strict mode the products against X and dY take three bf16 terms of the fp32 operand, in
  // tf32 mode two (16 significant bits): both within kProduct. The same layer runs strict, tf32,
  // then strict again, so that its buffers are laid out anew when the number of terms changes
  // (db's column of ones moves with it).
  auto gpu = make_backend<float>(Device::cuda);
  struct Shape {
    Index n, k, d, r;
  };
  for (const Shape shape : {Shape{256, 512, 384, 16}, Shape{37, 20, 36, 8}, Shape{64, 24, 40, 4}}) {
    for (const BasePrecision format : {BasePrecision::bf16}) {  // the native layer's format
      for (const Activation f : {Activation::relu, Activation::identity}) {
        const LayerSpec spec{.in = shape.k, .out = shape.d, .rank = shape.r, .base = format, .f = f,
                             .bias = BiasMode::trainable};
        const Draw d = draw({spec}, 111);
        gpu->set_math_mode(MathMode::strict);
        auto layer = make_lora_linear<float>(*gpu, config_of(spec, 0), d.W[0],
                                             HostVector<float>(d.b[0].row(0).transpose()), LayerChoice::fastest);
        layer->set_A(d.A[0]);
        layer->set_B(d.B[0]);
        CHECK(std::string(layer->implementation()) == "cuda_half");
        const bool relu_taken = f == Activation::relu && layer->take_output_activation(f);
        CHECK(relu_taken == (f == Activation::relu));
        REQUIRE(layer->take_half_activations(format));
        for (const MathMode math : {MathMode::strict, MathMode::tf32, MathMode::strict}) {
          gpu->set_math_mode(math);
          const std::string what = "n " + std::to_string(shape.n) + ", " + std::to_string(shape.k) + " -> " +
                                   std::to_string(shape.d) + ", r " + std::to_string(shape.r) + ", " + name_of(format) +
                                   (f == Activation::relu ? ", relu" : ", identity") +
                                   (math == MathMode::tf32 ? ", tf32" : ", strict");
          INFO(what << ": " << std::string(layer->implementation()));
          std::mt19937_64 gen(112);
          const HostMatrix<float> x = normal_matrix<float>(shape.n, shape.k, gen);
          const HostMatrix<float> dy = normal_matrix<float>(shape.n, shape.d, gen, 0.05);
          Observed obs;
          obs.native = {true};
          const HalfBuffer X = upload_half(*gpu, rounded(x, format), format);
          layer->forward_half(X.tensor());
          obs.H.push_back(download_half(*gpu, layer->mutable_half_output(), format));
          obs.out = obs.H.back().cast<float>();
          HostLayer h;
          h.W = layer->base().weight_host().cast<double>();
          h.b = wide(to_host(*gpu, layer->b()));
          h.A = wide(to_host(*gpu, layer->A()));
          h.B = wide(to_host(*gpu, layer->B()));
          h.s = double(layer->scale());
          h.relu = relu_taken;
          h.bias_trains = true;
          obs.layers.push_back(h);
          // The model hands backward_half dY with f' applied.
          const Mat dY = h.relu ? Mat(rounded(dy, format).cwiseProduct(positive(obs.H[0]))) : rounded(dy, format);
          const HalfBuffer dY16 = upload_half(*gpu, dY, format);
          HalfBuffer dX(*gpu, shape.n, shape.k);
          layer->backward_half(dY16.tensor(), &dX.tensor());
          obs.dA.push_back(to_host(*gpu, layer->dA()));
          obs.dB.push_back(to_host(*gpu, layer->dB()));
          obs.db.push_back(to_host(*gpu, layer->db()));
          obs.G.push_back(download_half(*gpu, dX.tensor(), format));
          // dY as given is the top's gradient: check_bounds rounds it again (exactly) and masks it.
          const HostMatrix<float> dy_rounded = dY.cast<float>();
          check_bounds(obs, x, &dy_rounded, format, what);
        }
      }
    }
  }
}

TEST_CASE("16-bit activations: a CUDA native layer on exactly representable values gives its roundings bit for bit") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  // The native layer's math (cuda_lora_linear.hpp): Y = round(f(X W^T + round(s U B^T + b))) and
  // dX = round(dY W + round(s (dY B) A)), where some of cuBLAS's kernels round X W^T (dY W) before
  // they add the 16-bit term: each entry must be one of the two. On values with few significant bits (X in quarters up to
  // 2, W in 64ths and A, B in 32nds up to 1/8, b in 64ths, dY in 256ths up to 1/32, s = 2) every
  // product and every sum is exact in fp32, and U and dU (under 16 significant bits) are exact in
  // their two bf16 terms, so both sides round the same exact values: each entry must be exactly
  // the formula's, whatever the products' order. With B = 0 and no bias, or W = 0, one of the two
  // roundings adds an exact zero and the result is the exact value rounded once. Entries that
  // match another formula instead (the definition's one rounding; or a third rounding, X W^T or
  // dY W rounded before the adapter's term is added) are counted, to say which it computes.
  // In tf32 mode (two bf16 terms for U and dU, whose 16 significant bits they hold exactly) the
  // same.
  auto gpu = make_backend<float>(Device::cuda);
  const BasePrecision bf16 = BasePrecision::bf16;
  struct Shape {
    Index n, k, d, r;
    MathMode math = MathMode::strict;
  };
  const auto grid = [](Index rows, Index cols, int range, double step, std::mt19937_64& gen) {
    std::uniform_int_distribution<int> pick(-range, range);
    HostMatrix<float> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(pick(gen) * step);
    return m;
  };
  const auto round_all = [&](const Mat& m) { return rounded(m, bf16); };
  for (const Shape shape : {Shape{256, 512, 384, 16}, Shape{37, 20, 36, 8}, Shape{64, 24, 40, 4},
                            Shape{256, 512, 384, 16, MathMode::tf32}, Shape{37, 20, 36, 8, MathMode::tf32}}) {
    gpu->set_math_mode(shape.math);
    for (const int variant : {0, 1, 2}) {  // both parts, B = 0 without bias, W = 0
      for (const Activation f : {Activation::identity, Activation::relu}) {
        const char* variant_name[] = {"W, B and b", "B = 0, no bias", "W = 0"};
        const std::string what = "n " + std::to_string(shape.n) + ", " + std::to_string(shape.k) + " -> " +
                                 std::to_string(shape.d) + ", r " + std::to_string(shape.r) + ", " +
                                 variant_name[variant] + (f == Activation::relu ? ", relu" : ", identity") +
                                 (shape.math == MathMode::tf32 ? ", tf32" : "");
        std::mt19937_64 gen(141);
        const HostMatrix<float> W = variant == 2 ? HostMatrix<float>(HostMatrix<float>::Zero(shape.d, shape.k))
                                                 : grid(shape.d, shape.k, 4, 1.0 / 64, gen);
        const HostMatrix<float> A = grid(shape.r, shape.k, 4, 1.0 / 32, gen);
        const HostMatrix<float> B = variant == 1 ? HostMatrix<float>(HostMatrix<float>::Zero(shape.d, shape.r))
                                                 : grid(shape.d, shape.r, 4, 1.0 / 32, gen);
        const HostMatrix<float> b = grid(1, shape.d, 8, 1.0 / 64, gen);
        const bool with_bias = variant != 1;
        const LayerSpec spec{.in = shape.k, .out = shape.d, .rank = shape.r, .base = bf16, .f = f,
                             .bias = with_bias ? BiasMode::trainable : BiasMode::none};
        auto layer = with_bias ? make_lora_linear<float>(*gpu, config_of(spec, 0), W,
                                                         HostVector<float>(b.row(0).transpose()), LayerChoice::fastest)
                               : make_lora_linear<float>(*gpu, config_of(spec, 0), W, LayerChoice::fastest);
        layer->set_A(A);
        layer->set_B(B);
        const bool relu = f == Activation::relu && layer->take_output_activation(f);
        INFO(what << ": " << std::string(layer->implementation()));
        REQUIRE(layer->take_half_activations(bf16));
        REQUIRE(double(layer->scale()) == 2.0);
        const Mat X = wide(grid(shape.n, shape.k, 8, 0.25, gen));
        const Mat dY = wide(grid(shape.n, shape.d, 8, 1.0 / 256, gen));
        const HalfBuffer X16 = upload_half(*gpu, X, bf16);
        layer->forward_half(X16.tensor());
        const Mat H = download_half(*gpu, layer->mutable_half_output(), bf16);
        const Mat dY_in = relu ? Mat(dY.cwiseProduct(positive(H))) : dY;  // f' applied, as the model hands it
        const HalfBuffer dY16 = upload_half(*gpu, dY_in, bf16);
        HalfBuffer dX16(*gpu, shape.n, shape.k);
        layer->backward_half(dY16.tensor(), &dX16.tensor());
        const Mat dX = download_half(*gpu, dX16.tensor(), bf16);

        // All exact in double (and in fp32).
        const Mat Wd = wide(W), Ad = wide(A), Bd = wide(B);
        const Mat P = X * Wd.transpose();
        Mat Tb = 2.0 * (X * Ad.transpose()) * Bd.transpose();
        if (with_bias) Tb.rowwise() += wide(b).row(0);
        const Mat Q = dY_in * Wd, V = 2.0 * (dY_in * Bd) * Ad;
        const auto f_of = [&](const Mat& m) { return relu ? Mat(m.cwiseMax(0.0)) : m; };
        const Mat Y_formula = round_all(f_of(P + round_all(Tb))), Y_definition = round_all(f_of(P + Tb));
        const Mat Y_third = round_all(f_of(round_all(P) + round_all(Tb)));
        const Mat dX_formula = round_all(Q + round_all(V)), dX_definition = round_all(Q + V);
        const Mat dX_third = round_all(round_all(Q) + round_all(V));
        for (const auto& [name, got, formula, definition, third] :
             {std::tuple<const char*, const Mat*, const Mat*, const Mat*, const Mat*>{"Y", &H, &Y_formula, &Y_definition,
                                                                                      &Y_third},
              std::tuple<const char*, const Mat*, const Mat*, const Mat*, const Mat*>{"dX", &dX, &dX_formula,
                                                                                       &dX_definition, &dX_third}}) {
          Index wrong = 0, as_definition = 0, as_third = 0, first = -1;
          for (Index i = 0; i < got->size(); ++i) {
            const double g = got->data()[i];
            as_third += g != formula->data()[i] && g == third->data()[i];
            if (g == formula->data()[i] || g == third->data()[i]) continue;
            if (wrong++ == 0) first = i;
            as_definition += g == definition->data()[i];
          }
          MESSAGE(what << ", " << std::string(name) << ": " << as_third << " of " << got->size()
                       << " entries are the third rounding's; " << wrong << " are neither formula's (" << as_definition
                       << " of them equal the definition's single rounding)"
                       << (first >= 0 ? "; the first " + std::to_string(got->data()[first]) + " for " +
                                            std::to_string(formula->data()[first])
                                      : std::string()));
          CHECK(wrong == 0);
        }
        // The gradients, from exact dY and U: to fp32 product accuracy.
        const Mat dB = 2.0 * dY_in.transpose() * (X * Ad.transpose()), dA = (2.0 * dY_in * Bd).transpose() * X;
        CHECK(max_rel(wide(to_host(*gpu, layer->dB())), dB) <= kFp32Accuracy);
        if (variant != 1) CHECK(max_rel(wide(to_host(*gpu, layer->dA())), dA) <= kFp32Accuracy);
        if (with_bias) CHECK(max_rel(wide(to_host(*gpu, layer->db())), Mat(dY_in.colwise().sum())) <= kFp32Accuracy);
      }
    }
  }
}

TEST_CASE("16-bit activations: CUDA native layers train as the reference does, with and without dropout") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  // Each step's loss within 16 u of the reference model's: the outputs differ by ~u of themselves
  // and the updates (Adam) by ~u of theirs, so the losses part by a few u over 30 steps; a wrong
  // gradient would steer the fast model elsewhere within a few steps. With dropout (the native
  // layer falls back to LoraLinear's products) both models draw the same masks from the same
  // seeds, so they agree as closely.
  auto gpu = make_backend<float>(Device::cuda);
  std::mt19937_64 gen(81);
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    for (const double dropout : {0.0, 0.25}) {
      std::vector<LayerSpec> specs = gpu_specs(64, 96, 40, 24, 8, format);
      for (LayerSpec& spec : specs) spec.dropout = dropout;
      const HostMatrix<float> x = normal_matrix<float>(100, 64, gen);
      const HostMatrix<float> y = teacher_targets(specs, x, 82);
      const int steps = 30;
      const std::vector<double> fast = train_losses(gpu, LayerChoice::fastest, specs, format, x, y, steps, 3e-3);
      const std::vector<double> ref = train_losses(gpu, LayerChoice::reference, specs, format, x, y, steps, 3e-3);
      double worst = 0;
      for (int i = 0; i < steps; ++i) worst = std::max(worst, std::fabs(fast[i] - ref[i]) / ref[i]);
      MESSAGE(name_of(format) << ", dropout " << dropout << ": loss " << fast.front() << " -> " << fast.back()
                              << " (reference " << ref.back() << "); largest relative difference " << worst);
      CHECK(fast.back() < 0.5 * fast.front());
      CHECK(worst <= 16 * half_unit_roundoff(format));
    }
  }
}

TEST_CASE("16-bit activations: CUDA dropout and a merged adapter on native layers match the reference") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  auto gpu = make_backend<float>(Device::cuda);
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    std::vector<LayerSpec> specs = gpu_specs(40, 72, 36, 20, 8, format);
    for (LayerSpec& spec : specs) spec.dropout = 0.3;
    const Draw d = draw(specs, 91);
    std::mt19937_64 gen(92);
    const Index n = 45;
    const HostMatrix<float> x = normal_matrix<float>(n, specs.front().in, gen);
    const HostMatrix<float> dy = normal_matrix<float>(n, specs.back().out, gen, 0.05);
    Model<float> fast = build(gpu, LayerChoice::fastest, specs, d), ref = build(gpu, LayerChoice::reference, specs, d);
    fast.set_activation_format(format);
    ref.set_activation_format(format);
    const std::string what = std::string(name_of(format)) + " dropout 0.3";
    // Dropout while training: the same masks as the reference's (the same seeds), and the
    // definition with those masks.
    const Observed f = run_step(fast, x, &dy), r = run_step(ref, x, &dy);
    for (std::size_t i = 0; i < specs.size(); ++i) {
      INFO("layer " << i << " is " << std::string(fast.layer(i).implementation()));
      CHECK((std::string(fast.layer(i).implementation()) == "cuda_half") == (format == BasePrecision::bf16));
      REQUIRE(f.layers[i].mask.size() == n * specs[i].in);
      CHECK((f.layers[i].mask.array() == r.layers[i].mask.array()).all());
      CHECK((f.layers[i].mask.array() == 0.0).any());
    }
    check_bounds(f, x, &dy, format, what + " fastest");
    check_chained(r, x, dy, format, what + " reference");
    CHECK(max_rel(wide(f.out), wide(r.out)) <= 3 * double(specs.size()) * half_unit_roundoff(format));

    // Inference without dropout (the native layer's own products on bf16), then merged: W + s B A
    // in the 16-bit W, rounded stochastically from the same seeds in both models, and the forward
    // without the adapter's term.
    for (Model<float>* model : {&fast, &ref}) model->set_training(false);
    const Observed fu = run_step(fast, x, nullptr);
    check_bounds(fu, x, nullptr, format, name_of(format) + " inference fastest");
    for (Model<float>* model : {&fast, &ref}) model->merge();
    for (std::size_t i = 0; i < specs.size(); ++i) {
      CHECK(fast.lora(i).merged());
      CHECK(fast.lora(i).base().weight_bits().bits == ref.lora(i).base().weight_bits().bits);
    }
    const Observed fm = run_step(fast, x, nullptr), rm = run_step(ref, x, nullptr);
    check_bounds(fm, x, nullptr, format, name_of(format) + " merged fastest");
    // Both run the same products on the same bits now; the native layer rounds the bias before
    // adding it (Y = round(f(X W^T + round(b)))), which moves each output by u |b| at most, and
    // what moves below travels up: 3 L u of the largest entry, as unmerged.
    CHECK(max_rel(wide(fm.out), wide(rm.out)) <= 3 * double(specs.size()) * half_unit_roundoff(format));
    // And near the unmerged forward: the merge moves each W entry by at most one spacing (2 u of
    // it), which moves an output by 2 u of its terms' magnitudes, a few times its own; with the
    // forwards' roundings, (3 L + 16) u of the largest entry. Leaving the adapter out of either
    // would move the outputs by about their own size.
    const double e_merge = max_rel(wide(fm.out), wide(fu.out));
    MESSAGE(name_of(format) << ": merged against unmerged forward " << e_merge << " of max |value|");
    CHECK(e_merge <= (3 * double(specs.size()) + 16) * half_unit_roundoff(format));
  }
}

TEST_CASE("16-bit activations: CUDA native layers' training step replays from a graph bit for bit") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  const std::vector<LayerSpec> specs = gpu_specs(64, 128, 64, 32, 8, BasePrecision::bf16);
  const Draw d = draw(specs, 101);
  std::mt19937_64 gen(102);
  const HostMatrix<float> x = normal_matrix<float>(96, 64, gen), y = normal_matrix<float>(96, 32, gen);
  struct Run {
    std::vector<float> losses;
    std::vector<HostMatrix<float>> parameters;
    std::int64_t recorded = 0, replayed = 0;
  };
  const auto train = [&](bool use_graphs, MathMode math) {
    auto gpu = make_backend<float>(Device::cuda, BackendOptions{.math = math});
    Model<float> model = build(gpu, LayerChoice::fastest, specs, d);
    model.set_activation_format(BasePrecision::bf16);
    TrainerConfig config{.method = TrainingMethod::lora, .adam = {.lr = 3e-3}};
    config.use_graphs = use_graphs;
    Trainer<float> trainer(model, config);
    Tensor<float> X = to_backend<float>(*gpu, x, "X"), Y = to_backend<float>(*gpu, y, "Y");
    Run run;
    for (int step = 0; step < 12; ++step) {
      trainer.step(X, Y);
      run.losses.push_back(trainer.loss());
    }
    for (const Parameter<float>& p : model.parameters()) run.parameters.push_back(to_host(*gpu, *p.value));
    run.recorded = trainer.recorded_steps();
    run.replayed = trainer.replayed_steps();
    return run;
  };
  for (const MathMode math : {MathMode::strict, MathMode::tf32}) {
    const Run eager = train(false, math), graph = train(true, math);
    const std::string mode = math == MathMode::tf32 ? "tf32" : "strict";
    MESSAGE(mode << " graph: recorded " << graph.recorded << ", replayed " << graph.replayed << "; final loss "
                 << graph.losses.back() << " (eager " << eager.losses.back() << ")");
    CHECK(eager.replayed == 0);
    CHECK(graph.recorded >= 1);
    CHECK(graph.replayed >= 12 - 3);
    CHECK(graph.losses == eager.losses);
    REQUIRE(graph.parameters.size() == eager.parameters.size());
    for (std::size_t i = 0; i < graph.parameters.size(); ++i) {
      INFO(mode << " parameter " << i);
      CHECK((graph.parameters[i].array() == eager.parameters[i].array()).all());
    }
  }
}

TEST_CASE("16-bit activations: a steady CUDA training step on native layers allocates nothing through the backend") {
  if (!cuda_or_skip("CUDA 16-bit activations test")) return;
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    const auto [first, third] =
        allocations_of_steps(make_backend<float>(Device::cuda), gpu_specs(64, 128, 64, 32, 8, format), format, 96);
    MESSAGE(name_of(format) << ": " << first << " tensors allocated in the first step, " << third << " in the third");
    CHECK(first > 0);
    CHECK(third == 0);
  }
}
