#pragma once
// The reduction operators of all_reduce_sum: sum(scale_r * data_r) is NCCL's pre-multiplied sum
// (ncclRedOpCreatePreMulSum) with the rank's scale as a host immediate, which NCCL copies when the
// operator is made. Making one per call would cost a host call into NCCL each step, so they are
// kept by scale (compared bit for bit): a training loop passes one or two scales over and over.
// When more distinct scales come than there are slots, the least recently used operator is
// destroyed, which NCCL allows as soon as the collectives given it have been issued.
#include <nccl.h>

#include <array>
#include <cstdint>
#include <cstring>

#include "distributed/nccl/nccl_check.cuh"

namespace relora {
namespace nccl_detail {

template <typename T>
ncclDataType_t nccl_type();
template <>
inline ncclDataType_t nccl_type<float>() {
  return ncclFloat32;
}
template <>
inline ncclDataType_t nccl_type<double>() {
  return ncclFloat64;
}

template <typename T>
class ScaleOps {
 public:
  // The operator that pre-multiplies by `scale`, made now when it is not kept yet.
  ncclRedOp_t op_for(T scale, ncclComm_t comm) {
    ++clock_;
    Slot* victim = &slots_[0];
    for (Slot& slot : slots_) {
      if (slot.made && std::memcmp(&slot.scale, &scale, sizeof(T)) == 0) {
        slot.last_use = clock_;
        return slot.op;
      }
      if (!slot.made || (victim->made && slot.last_use < victim->last_use)) victim = &slot;
    }
    if (victim->made) {
      victim->made = false;
      RELORA_NCCL_CHECK(ncclRedOpDestroy(victim->op, comm), comm);
    }
    T immediate = scale;
    RELORA_NCCL_CHECK(ncclRedOpCreatePreMulSum(&victim->op, &immediate, nccl_type<T>(), ncclScalarHostImmediate, comm),
                      comm);
    victim->scale = scale;
    victim->last_use = clock_;
    victim->made = true;
    return victim->op;
  }

  // Destroys every kept operator (before the communicator is destroyed); errors are ignored.
  void release(ncclComm_t comm) noexcept {
    for (Slot& slot : slots_) {
      if (slot.made) (void)ncclRedOpDestroy(slot.op, comm);
      slot.made = false;
    }
  }
  // Forgets the operators of a communicator that was aborted (which freed them).
  void forget() noexcept {
    for (Slot& slot : slots_) slot.made = false;
  }

 private:
  struct Slot {
    T scale{};
    ncclRedOp_t op{};
    std::uint64_t last_use = 0;
    bool made = false;
  };
  static constexpr int kSlots = 8;
  std::array<Slot, kSlots> slots_{};
  std::uint64_t clock_ = 0;
};

}  // namespace nccl_detail
}  // namespace relora
