// ThreadCommunicator, the ranks-as-threads Communicator: sums with per-rank scales against sums
// worked by hand, the same bits on every rank, broadcast, the barrier's ordering, abort waking a
// waiting rank with the reason, mismatched collectives reported, and run_ranks rethrowing the
// failing rank's own exception without any rank hanging.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "relora/relora.hpp"
#include "test_support.hpp"

using namespace relora;

namespace {

// The exception messages each rank caught, by rank, kept by the ranks themselves before rethrowing.
struct Caught {
  std::mutex mutex;
  std::vector<std::string> messages;
  explicit Caught(int ranks) : messages(std::size_t(ranks), "(no exception)") {}
  void keep(int rank, const std::exception& e) {
    std::lock_guard<std::mutex> lock(mutex);
    messages[std::size_t(rank)] = e.what();
  }
};

void pause_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

}  // namespace

TEST_CASE_TEMPLATE("all_reduce_sum applies each rank's scale and gives the hand-worked sums on every rank", T, float,
                   double) {
  // Rank r holds data_r[i] = 10 (r + 1) + i and passes scale (r + 1) / 2: every product and sum is
  // exact, so the expected values are exact too. 7 elements over 3 ranks: shares of 2, 2 and 3.
  const int ranks = 3;
  std::vector<std::vector<T>> results(ranks);
  run_ranks<T>(ranks, [&](const std::shared_ptr<Communicator<T>>& comm) {
    const int r = comm->rank();
    std::vector<T> data(7);
    for (int i = 0; i < 7; ++i) data[std::size_t(i)] = T(10 * (r + 1) + i);
    comm->all_reduce_sum(data.data(), 7, T(r + 1) / 2);
    comm->wait();
    results[std::size_t(r)] = data;
  });
  for (int i = 0; i < 7; ++i) {
    // 0.5 (10 + i) + 1 (20 + i) + 1.5 (30 + i) = 70 + 3 i
    const T expected = T(70 + 3 * i);
    for (int r = 0; r < ranks; ++r) CHECK(results[std::size_t(r)][std::size_t(i)] == expected);
  }
}

TEST_CASE_TEMPLATE("all_reduce_sum adds in rank order, so the bits do not depend on the threads' timing", T, float,
                   double) {
  // big + 1 - big: in rank order (big + 1) rounds back to big and the sum is 0; any other order
  // would give 1. The ranks arrive in a different order each round.
  const T big = std::is_same<T, float>::value ? T(1e8) : T(1e17);
  for (int round = 0; round < 3; ++round) {
    std::vector<T> results(3, T(-1));
    run_ranks<T>(3, [&](const std::shared_ptr<Communicator<T>>& comm) {
      const int r = comm->rank();
      pause_ms(((r + round) % 3) * 5);
      T value = r == 0 ? big : r == 1 ? T(1) : -big;
      comm->all_reduce_sum(&value, 1);
      results[std::size_t(r)] = value;
    });
    CAPTURE(round);
    CHECK(results == std::vector<T>(3, T(0)));
  }
}

TEST_CASE_TEMPLATE("every rank gets the same bits, equal to the sum taken in rank order", T, float, double) {
  const std::uint64_t seed = relora::testing::test_seed();
  INFO("seed " << seed);
  const int ranks = 4;
  const Index count = 1001;  // not a multiple of the ranks
  std::vector<std::vector<T>> inputs(ranks), outputs(ranks);
  std::vector<T> scales(ranks);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  for (int r = 0; r < ranks; ++r) {
    for (Index i = 0; i < count; ++i) inputs[std::size_t(r)].push_back(T(normal(gen)));
    scales[std::size_t(r)] = T(normal(gen));
  }
  run_ranks<T>(ranks, [&](const std::shared_ptr<Communicator<T>>& comm) {
    const std::size_t r = std::size_t(comm->rank());
    std::vector<T> data = inputs[r];
    comm->all_reduce_sum(data.data(), count, scales[r]);
    outputs[r] = data;
  });
  for (int r = 1; r < ranks; ++r) {
    CHECK(std::memcmp(outputs[0].data(), outputs[std::size_t(r)].data(), sizeof(T) * std::size_t(count)) == 0);
  }
  double worst = 0;
  for (Index i = 0; i < count; ++i) {
    T sum = scales[0] * inputs[0][std::size_t(i)];
    for (int r = 1; r < ranks; ++r) sum += scales[std::size_t(r)] * inputs[std::size_t(r)][std::size_t(i)];
    const double magnitude = std::max(1.0, double(std::abs(sum)));
    worst = std::max(worst, std::abs(double(outputs[0][std::size_t(i)] - sum)) / magnitude);
  }
  // The same operations in the same order: equal but for a fused multiply-add the compiler may
  // contract in one place and not the other.
  CHECK_MESSAGE(worst <= 4 * std::numeric_limits<T>::epsilon(), "max relative difference " << worst);
}

TEST_CASE("broadcast copies the root's buffer to every rank and leaves the root's alone") {
  std::vector<std::vector<double>> results(3);
  run_ranks<double>(3, [&](const std::shared_ptr<Communicator<double>>& comm) {
    const int r = comm->rank();
    std::vector<double> data = {double(r), double(10 * r), double(100 * r)};
    comm->broadcast(data.data(), 3, 2);
    comm->wait();
    results[std::size_t(r)] = data;
  });
  for (int r = 0; r < 3; ++r) CHECK(results[std::size_t(r)] == std::vector<double>{2, 20, 200});
}

TEST_CASE("a group of one rank: the sum is the scaled buffer, a broadcast changes nothing") {
  run_ranks<float>(1, [&](const std::shared_ptr<Communicator<float>>& comm) {
    CHECK(comm->size() == 1);
    CHECK(std::string(comm->kind()) == "threads");
    CHECK(comm->device() == Device::cpu);
    float data[2] = {3, -5};
    comm->all_reduce_sum(data, 2, 0.25f);
    CHECK(data[0] == 0.75f);
    CHECK(data[1] == -1.25f);
    comm->broadcast(data, 2, 0);
    CHECK(data[0] == 0.75f);
    comm->barrier();
  });
}

TEST_CASE("barrier: no rank passes it before every rank has arrived") {
  const int ranks = 4, rounds = 5;
  std::atomic<int> arrived{0};
  std::atomic<int> early{0};  // a rank that passed while some rank had not yet arrived
  run_ranks<float>(ranks, [&](const std::shared_ptr<Communicator<float>>& comm) {
    for (int round = 1; round <= rounds; ++round) {
      pause_ms(comm->rank() == (round % ranks) ? 10 : 0);  // one late rank per round
      arrived.fetch_add(1);
      comm->barrier();
      if (arrived.load() < round * ranks) early.fetch_add(1);
      comm->barrier();  // nobody arrives at the next round before everyone has looked
    }
  });
  CHECK(arrived.load() == ranks * rounds);
  CHECK(early.load() == 0);
}

TEST_CASE("abort wakes a rank waiting in a collective, naming the aborting rank and its reason") {
  auto ranks = make_thread_communicators<float>(2);
  std::string waiting_rank_saw = "(no exception)";
  std::thread waiting([&] {
    float x = 1;
    waiting_rank_saw = relora::testing::what_of([&] { ranks[0]->all_reduce_sum(&x, 1); });
  });
  pause_ms(20);  // rank 0 is waiting for rank 1
  ranks[1]->abort("out of memory on its device");
  waiting.join();
  CHECK(waiting_rank_saw == "rank 1 aborted: out of memory on its device");
  // Every later collective, on every rank, throws the same; a second abort keeps the first reason.
  ranks[0]->abort("another reason");
  float x = 1;
  CHECK_THROWS_WITH_AS(ranks[1]->all_reduce_sum(&x, 1), "rank 1 aborted: out of memory on its device",
                       CommunicatorError);
  CHECK_THROWS_AS(ranks[0]->broadcast(&x, 1, 0), CommunicatorError);
  CHECK_THROWS_AS(ranks[0]->barrier(), CommunicatorError);
}

TEST_CASE("run_ranks rethrows the failing rank's exception, of its own type, and no rank hangs") {
  Caught caught(3);
  const RankFunction<double> ranks_work = [&](const std::shared_ptr<Communicator<double>>& comm) {
    try {
      double x = 1;
      if (comm->rank() == 2) {
        pause_ms(10);  // the others are waiting in the sum
        throw ShapeError("rank 2's batch is [3 x 5], expected [3 x 4]");
      }
      for (int i = 0; i < 100; ++i) comm->all_reduce_sum(&x, 1);
    } catch (const std::exception& e) {
      caught.keep(comm->rank(), e);
      throw;
    }
  };
  CHECK_THROWS_WITH_AS(run_ranks<double>(3, ranks_work), "rank 2's batch is [3 x 5], expected [3 x 4]", ShapeError);
  for (int r : {0, 1}) {
    CHECK(caught.messages[std::size_t(r)] == "rank 2 aborted: rank 2's batch is [3 x 5], expected [3 x 4]");
  }

  struct NotAStdException {
    int code;
  };
  try {
    run_ranks<float>(2, [](const std::shared_ptr<Communicator<float>>& comm) {
      if (comm->rank() == 1) throw NotAStdException{42};
      comm->barrier();
    });
    FAIL("run_ranks returned");
  } catch (const NotAStdException& e) {
    CHECK(e.code == 42);
  }
}

TEST_CASE("ranks that issue different collectives all throw, naming what each issued") {
  Caught caught(2);
  const RankFunction<float> ranks_work = [&](const std::shared_ptr<Communicator<float>>& comm) {
    try {
      float data[4] = {1, 2, 3, 4};
      comm->all_reduce_sum(data, comm->rank() == 0 ? 3 : 4);
    } catch (const std::exception& e) {
      caught.keep(comm->rank(), e);
      throw;
    }
  };
  CHECK_THROWS_AS(run_ranks<float>(2, ranks_work), CommunicatorError);
  for (const std::string& m : caught.messages) {
    CHECK(m == "the ranks issued different collectives: rank 0 all_reduce_sum of 3 float; rank 1 all_reduce_sum "
               "of 4 float");
  }
  const std::string mixed = relora::testing::what_of([] {
    run_ranks<double>(2, [](const std::shared_ptr<Communicator<double>>& comm) {
      double x = 0;
      if (comm->rank() == 0) comm->barrier();
      if (comm->rank() == 1) comm->broadcast(&x, 1, 0);
    });
  });
  CHECK(mixed == "the ranks issued different collectives: rank 0 barrier; rank 1 broadcast of 1 double from rank 0");
}

TEST_CASE("bad arguments are refused with the value named") {
  CHECK_THROWS_WITH_AS(ThreadGroup(0), "ThreadGroup: size 0 must be >= 1", ConfigError);
  auto group = std::make_shared<ThreadGroup>(2);
  CHECK_THROWS_WITH_AS(ThreadCommunicator<float>(group, 2), "ThreadCommunicator: rank 2 is outside [0, 2)",
                       ConfigError);
  ThreadCommunicator<float> comm(group, 0);
  float x = 0;
  CHECK_THROWS_WITH_AS(comm.broadcast(&x, 1, 5), "ThreadGroup broadcast root: rank 5 is outside [0, 2)", ConfigError);
  CHECK_THROWS_WITH_AS(comm.all_reduce_sum(&x, -1), "ThreadCommunicator all_reduce_sum: rank 0 gave count -1",
                       ConfigError);
  CHECK_THROWS_AS(run_ranks<float>(0, [](const std::shared_ptr<Communicator<float>>&) {}), ConfigError);
}
