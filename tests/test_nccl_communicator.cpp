// The NCCL communicator on the GPUs this machine has, both ways of making it: one process per GPU
// (here one rank, its NCCL id carried by the file rendezvous, RANK=0 WORLD_SIZE=1 injected) and one
// thread per GPU (every visible GPU a rank). Each rank checks, against sums computed by hand:
//   - all_reduce_sum(data, n, scale_r) gives sum_r scale_r * data_r, the same bits on every rank,
//     and sees the work queued on the backend before it (a fill);
//   - wait(): a copy queued on the backend after it sees the result of four chained all-reduces of
//     32M elements (without the event it would race them);
//   - broadcast from the last rank; barrier(); an all-reduce recorded in a CUDA graph through the
//     backend's recording gives the eager result, when recorded and when replayed;
//   - abort(reason): every rank's next call throws CommunicatorError naming rank 0 and the reason.
// The GPU cases skip, with the reason, where relora has no NCCL or no GPU is visible; the checks of
// the entry points' errors run everywhere.
#include <doctest/doctest.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/distributed/communicator.hpp"
#include "relora/distributed/nccl_communicator.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::TempDir;
using relora::testing::what_of;

namespace {

bool nccl_or_skip(const char* suite) {
  std::string why;
  if (nccl_available(&why)) return true;
  MESSAGE(std::string(suite) << " skipped: " << why);
  return false;
}

// A backend on every visible GPU, in ordinal order.
template <typename T>
std::vector<std::shared_ptr<Backend<T>>> all_gpu_backends() {
  std::vector<std::shared_ptr<Backend<T>>> backends;
  for (int ordinal = 0; ordinal < 64; ++ordinal) {
    try {
      backends.push_back(make_backend<T>(Device::cuda, BackendOptions{.device_id = ordinal}));
    } catch (const DeviceError&) {
      break;
    }
  }
  return backends;
}

// Rank r's test data: small integers, so that every sum below is exact in float.
template <typename T>
std::vector<T> rank_data(int rank, std::size_t n) {
  std::vector<T> data(n);
  for (std::size_t i = 0; i < n; ++i) data[i] = T((rank + 1) * static_cast<int>(i % 7 + 1));
  return data;
}

template <typename T>
T rank_scale(int rank) {
  return T(0.5) * T(rank + 1);
}

// Collects one rank's failed checks as text, since the ranks run on threads of their own.
class Findings {
 public:
  explicit Findings(int rank) : rank_(rank) {}
  template <typename T>
  void expect_equal(const char* what, const std::vector<T>& got, const std::vector<T>& expected) {
    if (got.size() != expected.size()) {
      note(what, "size " + std::to_string(got.size()) + " instead of " + std::to_string(expected.size()));
      return;
    }
    std::size_t wrong = 0, first = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (std::memcmp(&got[i], &expected[i], sizeof(T)) != 0 && wrong++ == 0) first = i;
    }
    if (wrong > 0) {
      std::ostringstream text;
      text << wrong << " of " << got.size() << " values differ, first at " << first << ": " << got[first]
           << " instead of " << expected[first];
      note(what, text.str());
    }
  }
  void expect(bool ok, const char* what, const std::string& detail) {
    if (!ok) note(what, detail);
  }
  void note(const char* what, const std::string& detail) {
    text_ += "rank " + std::to_string(rank_) + ", " + what + ": " + detail + "\n";
  }
  const std::string& text() const { return text_; }

 private:
  int rank_;
  std::string text_;
};

template <typename T>
std::vector<T> download(Backend<T>& backend, const Tensor<T>& x) {
  std::vector<T> host(static_cast<std::size_t>(x.size()));
  backend.download(x, host.data());
  return host;
}

// Every check of one rank; the ranks of a communicator run it at the same time. Large buffers are
// of `large` elements.
template <typename T>
std::string check_rank(Communicator<T>& comm, Backend<T>& backend, std::size_t large) {
  const int rank = comm.rank(), size = comm.size();
  Findings findings(rank);
  findings.expect(std::string(comm.kind()) == "nccl", "kind", comm.kind());
  findings.expect(comm.device() == Device::cuda, "device", device_name(comm.device()));
  const std::size_t n = 1000;

  // sum_r scale_r * data_r, and the fill queued before the all-reduce is seen by it.
  Tensor<T> x = backend.allocate(1, static_cast<Index>(n));
  backend.upload(rank_data<T>(rank, n).data(), x);
  comm.all_reduce_sum(x.data(), x.size(), rank_scale<T>(rank));
  comm.wait();
  std::vector<T> expected(n, T(0));
  for (int r = 0; r < size; ++r) {
    const std::vector<T> data = rank_data<T>(r, n);
    for (std::size_t i = 0; i < n; ++i) expected[i] += rank_scale<T>(r) * data[i];
  }
  const std::vector<T> eager = download(backend, x);
  findings.expect_equal("all_reduce_sum with a scale", eager, expected);

  backend.fill(x, T(2));
  comm.all_reduce_sum(x.data(), x.size(), rank_scale<T>(rank));
  comm.wait();
  findings.expect_equal("all_reduce_sum after a fill on the backend", download(backend, x),
                        std::vector<T>(n, T(0.5) * T(size * (size + 1))));

  // Scale 1 (NCCL's plain sum) and a zero count (nothing to do).
  backend.upload(rank_data<T>(rank, n).data(), x);
  comm.all_reduce_sum(x.data(), x.size());
  comm.all_reduce_sum(x.data(), 0, T(3));
  comm.wait();
  std::vector<T> plain(n, T(0));
  for (int r = 0; r < size; ++r) {
    const std::vector<T> data = rank_data<T>(r, n);
    for (std::size_t i = 0; i < n; ++i) plain[i] += data[i];
  }
  findings.expect_equal("all_reduce_sum with scale 1", download(backend, x), plain);

  // wait(): a copy queued after it sees four chained all-reduces of a large buffer. Every rank
  // starts from the same data, so each round multiplies it by 1.5 * size (exactly, in float).
  {
    Tensor<T> big = backend.allocate(1, static_cast<Index>(large)), copy = backend.allocate(1, static_cast<Index>(large));
    backend.upload(rank_data<T>(0, large).data(), big);
    backend.fill(copy, T(-1));
    for (int round = 0; round < 4; ++round) comm.all_reduce_sum(big.data(), big.size(), T(1.5));
    comm.wait();
    backend.copy(big, copy);
    const T factor = T(std::pow(1.5 * size, 4));
    std::vector<T> after(large);
    const std::vector<T> data = rank_data<T>(0, large);
    for (std::size_t i = 0; i < large; ++i) after[i] = factor * data[i];
    findings.expect_equal("a copy queued after wait()", download(backend, copy), after);
  }

  // broadcast from the last rank.
  backend.upload(rank_data<T>(rank, n).data(), x);
  comm.broadcast(x.data(), x.size(), size - 1);
  comm.wait();
  findings.expect_equal("broadcast from the last rank", download(backend, x), rank_data<T>(size - 1, n));

  comm.barrier();

  // An all-reduce recorded in a CUDA graph: the recording runs it once, a replay again.
  backend.upload(rank_data<T>(rank, n).data(), x);
  if (!backend.begin_recording()) {
    findings.note("recording", "the CUDA backend refused begin_recording");
  } else {
    std::uint64_t id = 0;
    try {
      comm.all_reduce_sum(x.data(), x.size(), rank_scale<T>(rank));
      comm.wait();
      id = backend.end_recording();
    } catch (...) {
      backend.drop_recording();
      throw;
    }
    findings.expect(id != 0, "recording", "end_recording discarded the recorded all-reduce");
    if (id != 0) {
      findings.expect_equal("recorded all-reduce", download(backend, x), eager);
      backend.upload(rank_data<T>(rank, n).data(), x);
      findings.expect(backend.replay(id, {}), "replay", "replay refused the recording");
      findings.expect_equal("replayed all-reduce", download(backend, x), eager);
    }
  }
  comm.barrier();
  return findings.text();
}

// After rank 0 aborts (once the others are past their last collective), every rank's next call
// throws CommunicatorError naming rank 0 and its reason.
template <typename T>
std::string check_abort(Communicator<T>& comm, Backend<T>& backend, std::barrier<>& all_ranks) {
  Findings findings(comm.rank());
  Tensor<T> x = backend.allocate(1, 4);
  backend.fill(x, T(1));
  all_ranks.arrive_and_wait();
  if (comm.rank() == 0) {
    comm.abort("test reason");
    comm.abort("a second abort changes nothing");
  }
  all_ranks.arrive_and_wait();
  const auto expect_abort = [&findings](const char* what, const std::function<void()>& call) {
    try {
      call();
      findings.note(what, "no exception after rank 0 aborted");
    } catch (const CommunicatorError& e) {
      findings.expect(std::string(e.what()).find("rank 0 aborted: test reason") != std::string::npos, what, e.what());
    } catch (const std::exception& e) {
      findings.note(what, std::string("not a CommunicatorError: ") + e.what());
    }
  };
  expect_abort("all_reduce_sum after abort", [&] { comm.all_reduce_sum(x.data(), x.size(), T(2)); });
  expect_abort("broadcast after abort", [&] { comm.broadcast(x.data(), x.size(), 0); });
  expect_abort("wait after abort", [&] { comm.wait(); });
  expect_abort("barrier after abort", [&] { comm.barrier(); });
  return findings.text();
}

// Runs `rank_main(rank)` on one thread per rank; returns what each rank found wrong, or its exception.
std::vector<std::string> on_rank_threads(int size, const std::function<std::string(int)>& rank_main) {
  std::vector<std::string> findings(size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank) {
    threads.emplace_back([&findings, &rank_main, rank] {
      try {
        findings[rank] = rank_main(rank);
      } catch (const std::exception& e) {
        findings[rank] = "rank " + std::to_string(rank) + " threw: " + e.what();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return findings;
}

template <typename T>
void check_thread_per_gpu(std::size_t large) {
  const std::vector<std::shared_ptr<Backend<T>>> backends = all_gpu_backends<T>();
  REQUIRE(!backends.empty());
  MESSAGE("nccl thread-per-GPU communicator over " << backends.size() << " GPU(s)");
  NcclOptions options;
  options.barrier_timeout = std::chrono::seconds(60);
  std::vector<std::unique_ptr<Communicator<T>>> comms = make_nccl_communicators<T>(backends, options);
  REQUIRE(comms.size() == backends.size());
  const int size = static_cast<int>(comms.size());
  for (int rank = 0; rank < size; ++rank) {
    CHECK(comms[rank]->rank() == rank);
    CHECK(comms[rank]->size() == size);
  }
  for (const std::string& found : on_rank_threads(size, [&](int rank) {
         return check_rank<T>(*comms[rank], *backends[rank], large);
       })) {
    CHECK(found == "");
  }
  std::barrier<> all_ranks(size);
  for (const std::string& found : on_rank_threads(size, [&](int rank) {
         return check_abort<T>(*comms[rank], *backends[rank], all_ranks);
       })) {
    CHECK(found == "");
  }
}

}  // namespace

TEST_CASE("nccl communicator: one process per GPU, one rank, its id through the file rendezvous") {
  if (!nccl_or_skip("nccl one-process-per-GPU communicator")) return;
  const TempDir dir;
  const LaunchEnvironment env = parse_launch_environment(
      {{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCAL_RANK", "0"}, {"RELORA_RENDEZVOUS_FILE", dir.file("nccl-id")}});
  REQUIRE(env.rendezvous == RendezvousKind::file);
  auto backend = make_backend<float>(Device::cuda, BackendOptions{.device_id = env.local_rank});
  NcclOptions options;
  options.barrier_timeout = std::chrono::seconds(60);
  std::unique_ptr<Communicator<float>> comm = make_nccl_communicator<float>(env, backend, options);
  CHECK(comm->rank() == 0);
  CHECK(comm->size() == 1);
  CHECK(dir.entries() == std::vector<std::string>{"nccl-id"});  // rank 0 published its id there
  CHECK(check_rank<float>(*comm, *backend, std::size_t(1) << 25) == "");
  std::barrier<> alone(1);
  CHECK(check_abort<float>(*comm, *backend, alone) == "");
}

TEST_CASE("nccl communicator: one thread per GPU over every visible GPU, float") {
  if (!nccl_or_skip("nccl thread-per-GPU communicator")) return;
  check_thread_per_gpu<float>(std::size_t(1) << 25);
}

TEST_CASE("nccl communicator: one thread per GPU over every visible GPU, double") {
  if (!nccl_or_skip("nccl thread-per-GPU communicator (double)")) return;
  check_thread_per_gpu<double>(std::size_t(1) << 22);
}

TEST_CASE("nccl communicator: bad arguments and a rank's own errors name the value") {
  if (!nccl_or_skip("nccl communicator argument checks")) return;
  auto backend = make_backend<float>(Device::cuda);
  std::vector<std::unique_ptr<Communicator<float>>> comms = make_nccl_communicators<float>({backend});
  Communicator<float>& comm = *comms[0];
  Tensor<float> x = backend->allocate(1, 4);
  backend->fill(x, 0.5f);  // the collectives below read it
  CHECK(what_of([&] { comm.all_reduce_sum(x.data(), -1); }) ==
        "nccl all_reduce_sum of rank 0: count -1 must not be negative");
  CHECK(what_of([&] { comm.all_reduce_sum(nullptr, 4); }) == "nccl all_reduce_sum of rank 0: null buffer of 4 elements");
  CHECK(what_of([&] { comm.all_reduce_sum(x.data(), 4, std::nanf("")); }) ==
        "nccl all_reduce_sum of rank 0: scale nan is not finite");
  CHECK(what_of([&] { comm.broadcast(x.data(), 4, 1); }) == "nccl broadcast of rank 0: root 1 must be in [0, 1)");
  CHECK_THROWS_WITH_AS(make_nccl_communicators<float>({backend, backend}),
                       doctest::Contains("share CUDA device 0; each rank needs a device of its own"), ConfigError);
  // A recorded collective cannot wait for one queued before the recording and not waited for.
  comm.all_reduce_sum(x.data(), x.size(), 2.0f);
  REQUIRE(backend->begin_recording());
  CHECK_THROWS_WITH_AS(comm.all_reduce_sum(x.data(), x.size(), 2.0f),
                       doctest::Contains("nccl all_reduce_sum of rank 0 in a CUDA graph recording after collectives "
                                         "queued before it and not waited for: call wait() before begin_recording()"),
                       ConfigError);
  CHECK_THROWS_AS(comm.wait(), ConfigError);
  backend->drop_recording();
  comm.wait();
  // Once waited for, a wait() in a recording with no collective of its own joins nothing, and the
  // recording is kept.
  REQUIRE(backend->begin_recording());
  backend->fill(x, 1.0f);
  comm.wait();
  CHECK(backend->end_recording() != 0);
  backend->drop_recording();
  // A recording cannot hold a barrier: refused before anything is queued.
  REQUIRE(backend->begin_recording());
  CHECK_THROWS_WITH_AS(comm.barrier(), doctest::Contains("inside a CUDA graph recording"), ConfigError);
  backend->drop_recording();
  comm.barrier();
}

TEST_CASE("nccl communicator: the entry points refuse what they cannot use, with or without NCCL") {
  // Everywhere: a CPU backend is no GPU rank (or, without NCCL, the build says why first).
  auto cpu = make_backend<float>(Device::cpu);
  const std::string from_env = what_of([&] { make_nccl_communicator<float>(LaunchEnvironment{}, cpu); });
  const std::string from_list = what_of([&] { make_nccl_communicators<double>({make_backend<double>(Device::cpu)}); });
  CHECK_THROWS_AS(make_nccl_communicator<float>(LaunchEnvironment{}, cpu), ConfigError);
  CHECK_THROWS_AS(make_nccl_communicators<float>({}), ConfigError);
  std::string why;
  if (nccl_available(&why) || why.find("without NCCL") == std::string::npos) {
    CHECK(doctest::String(from_env.c_str()) ==
          doctest::Contains("nccl communicator of rank 0 needs a CUDA backend, got "));
    CHECK(doctest::String(from_list.c_str()) ==
          doctest::Contains("nccl communicator of rank 0 needs a CUDA backend, got "));
    CHECK(what_of([] { make_nccl_communicators<float>({}); }) == "make_nccl_communicators: no backends given");
  } else {
    CHECK(doctest::String(from_env.c_str()) == doctest::Contains("make_nccl_communicator: relora was built without NCCL"));
    CHECK(doctest::String(from_list.c_str()) == doctest::Contains("make_nccl_communicators: relora was built without NCCL"));
  }
}
