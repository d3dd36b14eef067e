// Rank 0's blob reaching every rank, with threads as ranks: over TCP on the loopback (1, 2 and 4
// ranks, a stray connection, a rank of another job, timeouts) and through a file in a temporary
// directory (1 and 4 ranks, a file left by an earlier job, timeouts). Every wait is bounded by a
// short timeout, so a broken rendezvous fails the test instead of hanging it.
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "relora/distributed/communicator.hpp"
#include "relora/distributed/file_rendezvous.hpp"
#include "relora/distributed/rendezvous.hpp"
#include "relora/distributed/tcp_rendezvous.hpp"
#include "relora/io/atomic_file.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::TempDir;
using relora::testing::what_of;
using namespace std::chrono_literals;

namespace {

// A port that was free a moment ago: bound to port 0, read back, released.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  socklen_t length = sizeof address;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0);
  ::close(fd);
  return ntohs(address.sin_port);
}

doctest::Contains contains(const std::string& part) { return doctest::Contains(part.c_str()); }

std::vector<std::uint8_t> test_blob(std::size_t size) {
  std::vector<std::uint8_t> blob(size);
  for (std::size_t i = 0; i < size; ++i) blob[i] = static_cast<std::uint8_t>((i * 37 + 11) & 0xff);
  return blob;
}

// Runs `rank_main(rank)` on one thread per rank and returns each rank's blob or error text.
struct RankResult {
  std::vector<std::uint8_t> blob;
  std::string error;
};

std::vector<RankResult> run_ranks(int world_size, const std::function<std::vector<std::uint8_t>(int)>& rank_main) {
  std::vector<RankResult> results(world_size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world_size; ++rank) {
    threads.emplace_back([&results, &rank_main, rank] {
      try {
        results[rank].blob = rank_main(rank);
      } catch (const std::exception& e) {
        results[rank].error = e.what();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return results;
}

// The TCP exchange of `world_size` ranks on a free loopback port, retried on a fresh port when
// another program took the port between free_port() and rank 0's bind.
std::vector<RankResult> tcp_exchange(int world_size, const std::vector<std::uint8_t>& blob) {
  for (int attempt = 0;; ++attempt) {
    const int port = free_port();
    std::vector<RankResult> results = run_ranks(world_size, [&](int rank) {
      TcpRendezvous rendezvous("127.0.0.1", port, rank, world_size, "job", 10s);
      return rendezvous.share_from_rank0(rank == 0 ? blob : std::vector<std::uint8_t>{});
    });
    if (attempt < 3 && results[0].error.find("cannot listen") != std::string::npos) continue;
    return results;
  }
}

}  // namespace

TEST_CASE("tcp rendezvous: rank 0's blob reaches 1, 2 and 4 ranks on the loopback") {
  const std::vector<std::uint8_t> blob = test_blob(128);
  for (const int world_size : {1, 2, 4}) {
    CAPTURE(world_size);
    const std::vector<RankResult> results = tcp_exchange(world_size, blob);
    for (int rank = 0; rank < world_size; ++rank) {
      CAPTURE(rank);
      CHECK(results[rank].error == "");
      CHECK(results[rank].blob == blob);
    }
  }
}

TEST_CASE("tcp rendezvous: a host name resolves, and a stray connection is dropped without being counted") {
  const std::vector<std::uint8_t> blob = test_blob(128);
  const int port = free_port();
  std::atomic<bool> stray_done{false};
  const std::vector<RankResult> results = run_ranks(3, [&](int rank) -> std::vector<std::uint8_t> {
    if (rank == 2) {
      // Not a rank: connects as soon as rank 0 listens and sends bytes that are no hello.
      const auto deadline = std::chrono::steady_clock::now() + 5s;
      while (!stray_done && std::chrono::steady_clock::now() < deadline) {
        const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        address.sin_port = htons(static_cast<std::uint16_t>(port));
        if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
          const char junk[] = "GET / HTTP/1.0\r\n\r\n";
          (void)::send(fd, junk, sizeof junk, MSG_NOSIGNAL);
          stray_done = true;
        }
        ::close(fd);
        if (!stray_done) std::this_thread::sleep_for(2ms);
      }
      stray_done = true;
      return {};
    }
    if (rank == 1) {
      while (!stray_done) std::this_thread::sleep_for(1ms);  // the stray connection comes first
    }
    TcpRendezvous rendezvous("localhost", port, rank, 2, "job", 10s);
    return rendezvous.share_from_rank0(rank == 0 ? blob : std::vector<std::uint8_t>{});
  });
  CHECK(results[0].error == "");
  CHECK(results[1].error == "");
  CHECK(results[0].blob == blob);
  CHECK(results[1].blob == blob);
}

TEST_CASE("tcp rendezvous: a rank of another job is refused at once, and rank 0 names who never came") {
  const int port = free_port();
  const auto start = std::chrono::steady_clock::now();
  const std::vector<RankResult> results = run_ranks(2, [&](int rank) {
    TcpRendezvous rendezvous("127.0.0.1", port, rank, 2, rank == 0 ? "job-a" : "job-b", rank == 0 ? 1500ms : 10s);
    return rendezvous.share_from_rank0(test_blob(16));
  });
  CHECK(doctest::String(results[1].error.c_str()) ==
        doctest::Contains("refused rank 1: job key 'job-b' differs from rank 0's 'job-a'"));
  CHECK(doctest::String(results[0].error.c_str()) == doctest::Contains("rank(s) 1 of 2 never came"));
  CHECK(doctest::String(results[0].error.c_str()) == doctest::Contains("job key 'job-b' differs"));
  CHECK(std::chrono::steady_clock::now() - start < 8s);
}

TEST_CASE("tcp rendezvous: timeouts name the address and how long the rank waited") {
  const int port = free_port();
  // A rank whose rank 0 never listens.
  const std::string alone = what_of([&] {
    TcpRendezvous rendezvous("127.0.0.1", port, 1, 2, "job", 200ms);
    (void)rendezvous.share_from_rank0({});
  });
  CHECK(doctest::String(alone.c_str()) == doctest::Contains("rank 1 waited 0."));
  CHECK(doctest::String(alone.c_str()) == contains("for rank 0 at tcp 127.0.0.1:" + std::to_string(port)));
  CHECK_THROWS_AS(
      [&] {
        TcpRendezvous rendezvous("127.0.0.1", port, 1, 2, "job", 200ms);
        (void)rendezvous.share_from_rank0({});
      }(),
      CommunicatorError);
  // A rank 0 whose peers never come.
  const std::string lonely = what_of([&] {
    TcpRendezvous rendezvous("127.0.0.1", port, 0, 4, "job", 200ms);
    (void)rendezvous.share_from_rank0(test_blob(8));
  });
  CHECK(doctest::String(lonely.c_str()) == doctest::Contains("rank 0 waited 0."));
  CHECK(doctest::String(lonely.c_str()) == contains("on port " + std::to_string(port)));
  CHECK(doctest::String(lonely.c_str()) == doctest::Contains("rank(s) 1, 2, 3 of 4 never came"));
  // A name that cannot resolve: at once, or (no resolver) at the timeout; either way it is named.
  const std::string unresolved = what_of([&] {
    TcpRendezvous rendezvous("no-such-host.invalid", port, 1, 2, "job", 300ms);
    (void)rendezvous.share_from_rank0({});
  });
  CHECK(doctest::String(unresolved.c_str()) == contains("no-such-host.invalid:" + std::to_string(port)));
}

TEST_CASE("tcp rendezvous: bad arguments name the value") {
  CHECK(what_of([] { TcpRendezvous("", 1, 0, 1, "", 1s); }) == "tcp rendezvous: the address is empty");
  CHECK(what_of([] { TcpRendezvous("h", 0, 0, 1, "", 1s); }) == "tcp rendezvous h: port 0 must be in [1, 65535]");
  CHECK(what_of([] { TcpRendezvous("h", 80, 2, 2, "", 1s); }) ==
        "tcp rendezvous tcp h:80: rank 2 must be in [0, 2)");
  CHECK(what_of([] { TcpRendezvous("h", 80, 0, 2, "", 0s); }) ==
        "tcp rendezvous tcp h:80: timeout 0 ms must be positive");
  CHECK(what_of([] {
          TcpRendezvous rendezvous("h", 80, 0, 1, "", 1s);
          (void)rendezvous.share_from_rank0(std::vector<std::uint8_t>(kMaxRendezvousBlobBytes + 1));
        }) == "tcp h:80: blob of 65537 bytes, above the limit of 65536");
}

TEST_CASE("file rendezvous: rank 0's blob reaches 1 and 4 ranks, readers started first") {
  const TempDir dir;
  const std::vector<std::uint8_t> blob = test_blob(128);
  for (const int world_size : {1, 4}) {
    CAPTURE(world_size);
    const std::string path = dir.file("id-" + std::to_string(world_size));
    const std::vector<RankResult> results = run_ranks(world_size, [&](int rank) {
      if (rank == 0) std::this_thread::sleep_for(50ms);
      FileRendezvous rendezvous(path, rank, world_size, "job", 10s);
      return rendezvous.share_from_rank0(rank == 0 ? blob : std::vector<std::uint8_t>{});
    });
    for (int rank = 0; rank < world_size; ++rank) {
      CAPTURE(rank);
      CHECK(results[rank].error == "");
      CHECK(results[rank].blob == blob);
    }
  }
  // Only the published file is left: no temporary file behind.
  CHECK(dir.entries().size() == 2);
}

TEST_CASE("file rendezvous: a file left by an earlier job is not taken") {
  const TempDir dir;
  const std::string path = dir.file("id");
  {
    FileRendezvous earlier(path, 0, 2, "job-1", 1s);
    (void)earlier.share_from_rank0(test_blob(4));
  }
  // Only the stale file: the reader waits it out and says what it saw.
  const std::string stale = what_of([&] {
    FileRendezvous rendezvous(path, 1, 2, "job-2", 200ms);
    (void)rendezvous.share_from_rank0({});
  });
  CHECK(doctest::String(stale.c_str()) == doctest::Contains("rank 1 waited 0."));
  CHECK(doctest::String(stale.c_str()) == contains("for rank 0's blob at " + path));
  CHECK(doctest::String(stale.c_str()) ==
        doctest::Contains("a file left by another job (job key 'job-1', this job's is 'job-2')"));
  // Of the same key but another world size: not taken either.
  const std::string resized = what_of([&] {
    FileRendezvous rendezvous(path, 1, 3, "job-1", 200ms);
    (void)rendezvous.share_from_rank0({});
  });
  CHECK(doctest::String(resized.c_str()) == doctest::Contains("a file of this job key for 2 ranks, this job has 3"));
  // A file that is not a rendezvous at all.
  write_file_atomically(dir.file("junk"), std::vector<std::uint8_t>{'h', 'i'});
  const std::string junk = what_of([&] {
    FileRendezvous rendezvous(dir.file("junk"), 1, 2, "job", 100ms);
    (void)rendezvous.share_from_rank0({});
  });
  CHECK(doctest::String(junk.c_str()) == doctest::Contains("not a rendezvous blob"));
  // With the new job's rank 0 writing late, the reader takes the new blob, not the stale one.
  const std::vector<std::uint8_t> fresh = test_blob(128);
  const std::vector<RankResult> results = run_ranks(2, [&](int rank) {
    if (rank == 0) std::this_thread::sleep_for(100ms);
    FileRendezvous rendezvous(path, rank, 2, "job-2", 10s);
    return rendezvous.share_from_rank0(rank == 0 ? fresh : std::vector<std::uint8_t>{});
  });
  CHECK(results[1].error == "");
  CHECK(results[1].blob == fresh);
}

TEST_CASE("file rendezvous: bad arguments and an unwritable path name the value") {
  CHECK(what_of([] { FileRendezvous("", 0, 1, "", 1s); }) == "file rendezvous: the path is empty");
  CHECK(what_of([] { FileRendezvous("/tmp/x", -1, 2, "", 1s); }) ==
        "file rendezvous /tmp/x: rank -1 must be in [0, 2)");
  CHECK(what_of([] { FileRendezvous("/tmp/x", 0, 0, "", 1s); }) ==
        "file rendezvous /tmp/x: world size 0 must be at least 1");
  CHECK(what_of([] { FileRendezvous("/tmp/x", 0, 1, std::string(5000, 'k'), 1s); }) ==
        "file rendezvous /tmp/x: job key of 5000 bytes, above the limit of 4096");
  const std::string unwritable = what_of([] {
    FileRendezvous rendezvous("/nonexistent-relora-dir/id", 0, 2, "job", 1s);
    (void)rendezvous.share_from_rank0(test_blob(4));
  });
  CHECK(doctest::String(unwritable.c_str()) == doctest::Contains("file rendezvous: rank 0 cannot publish its blob"));
  CHECK(doctest::String(unwritable.c_str()) == doctest::Contains("/nonexistent-relora-dir/id"));
}

TEST_CASE("make_rendezvous: the kind the launch environment names") {
  const TempDir dir;
  LaunchEnvironment env;
  CHECK(make_rendezvous(env)->description() == "none (one rank)");
  CHECK(make_rendezvous(env)->share_from_rank0(test_blob(3)) == test_blob(3));
  env.rendezvous = RendezvousKind::file;
  env.rendezvous_file = dir.file("id");
  CHECK(make_rendezvous(env)->description() == "file " + dir.file("id"));
  env.rendezvous = RendezvousKind::tcp;
  env.master_addr = "node0";
  env.master_port = 29500;
  CHECK(make_rendezvous(env)->description() == "tcp node0:29500");
  env.rendezvous = RendezvousKind::none;
  env.world_size = 2;
  CHECK_THROWS_AS(make_rendezvous(env), ConfigError);
}
