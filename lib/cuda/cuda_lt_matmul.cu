#include "cuda/cuda_lt_matmul.cuh"

#include <initializer_list>
#include <string>

#include "cuda/cuda_check.cuh"
#include "relora/core/errors.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// The largest power of two (at most 256) dividing every address: the heuristic's minimum
// alignments, so no plan is chosen that needs more than the operands have.
unsigned common_alignment(std::initializer_list<const void*> pointers) {
  unsigned alignment = 256;
  for (const void* p : pointers) {
    if (p == nullptr) continue;
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    while (alignment > 1 && address % alignment != 0) alignment /= 2;
  }
  return alignment;
}

template <typename V>
void set(cublasLtMatmulDesc_t operation, cublasLtMatmulDescAttributes_t attribute, const V& value) {
  RELORA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(operation, attribute, &value, sizeof value));
}

}  // namespace

LtMatmul::LtMatmul(cudaStream_t stream, void* workspace, std::size_t workspace_bytes)
    : stream_(stream), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  RELORA_CUBLAS_CHECK(cublasLtCreate(&handle_));
}

LtMatmul::~LtMatmul() {
  for (auto& entry : plans_) release(entry.second);
  if (handle_) (void)cublasLtDestroy(handle_);
}

void LtMatmul::release(Plan& plan) {
  if (plan.a) (void)cublasLtMatrixLayoutDestroy(plan.a);
  if (plan.b) (void)cublasLtMatrixLayoutDestroy(plan.b);
  if (plan.d) (void)cublasLtMatrixLayoutDestroy(plan.d);
  if (plan.operation) (void)cublasLtMatmulDescDestroy(plan.operation);
}

LtMatmul::Plan& LtMatmul::plan(const Key& key) {
  auto found = plans_.find(key);
  if (found != plans_.end()) return found->second;
  const auto [transpose_a, transpose_b, m, n, k, lda, ldb, ldd, type, compute, with_bias, alignment, relu, d_type] = key;
  Plan p;
  try {
    RELORA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.operation, cublasComputeType_t(compute), CUDA_R_32F));
    set(p.operation, CUBLASLT_MATMUL_DESC_TRANSA, transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N);
    set(p.operation, CUBLASLT_MATMUL_DESC_TRANSB, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N);
    if (with_bias) set(p.operation, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUDA_R_32F);
    if (with_bias || relu) {
      const cublasLtEpilogue_t epilogue = relu ? (with_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU)
                                               : CUBLASLT_EPILOGUE_BIAS;
      set(p.operation, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
    }
    const auto data_type = cudaDataType_t(type);
    // A stored column-major: op(A) is m x k, so A is k x m when transposed.
    RELORA_CUBLAS_CHECK(transpose_a ? cublasLtMatrixLayoutCreate(&p.a, data_type, k, m, lda)
                                    : cublasLtMatrixLayoutCreate(&p.a, data_type, m, k, lda));
    RELORA_CUBLAS_CHECK(transpose_b ? cublasLtMatrixLayoutCreate(&p.b, data_type, n, k, ldb)
                                    : cublasLtMatrixLayoutCreate(&p.b, data_type, k, n, ldb));
    RELORA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, cudaDataType_t(d_type), m, n, ldd));
    cublasLtMatmulPreference_t preference = nullptr;
    RELORA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    const auto set_preference = [&](cublasLtMatmulPreferenceAttributes_t attribute, auto value) {
      return cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof value);
    };
    cublasStatus_t status = set_preference(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, std::uint64_t(workspace_bytes_));
    for (const auto attribute : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                 CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
      if (status == CUBLAS_STATUS_SUCCESS) status = set_preference(attribute, std::uint32_t(alignment));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found_count = 0;
    if (status == CUBLAS_STATUS_SUCCESS) {
      status = cublasLtMatmulAlgoGetHeuristic(handle_, p.operation, p.a, p.b, p.d, p.d, preference, 1, &result,
                                              &found_count);
    }
    (void)cublasLtMatmulPreferenceDestroy(preference);
    RELORA_CUBLAS_CHECK(status);
    if (found_count == 0) {
      throw DeviceError("cuBLASLt has no algorithm for the product of " + std::to_string(m) + " x " +
                        std::to_string(k) + " by " + std::to_string(k) + " x " + std::to_string(n) +
                        (with_bias ? " with a bias" : "") + (relu ? (with_bias ? " and a ReLU" : " with a ReLU") : ""));
    }
    p.algo = result.algo;
  } catch (...) {
    release(p);
    throw;
  }
  return plans_.emplace(key, p).first->second;
}

void LtMatmul::multiply(const Product& q) {
  if (q.bias != nullptr && q.d_type != CUDA_R_32F) {
    throw ConfigError("cuBLASLt product: an fp32 bias needs an fp32 result (a 16-bit result takes its bias elsewhere)");
  }
  const Key key{q.transpose_a, q.transpose_b, q.m, q.n, q.k, q.lda, q.ldb, q.ldd, int(q.type), int(q.compute),
                q.bias != nullptr, common_alignment({q.A, q.B, q.D, q.bias}), q.relu, int(q.d_type)};
  Plan& p = plan(key);
  if (q.bias) set(p.operation, CUBLASLT_MATMUL_DESC_BIAS_POINTER, q.bias);
  RELORA_CUBLAS_CHECK(cublasLtMatmul(handle_, p.operation, &q.alpha, q.A, p.a, q.B, p.b, &q.beta, q.D, p.d, q.D, p.d,
                                     &p.algo, workspace_, workspace_bytes_, stream_));
}

}  // namespace cuda_detail
}  // namespace relora
