#include "relora/distributed/file_rendezvous.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <thread>
#include <utility>

#include "distributed/rendezvous_arguments.hpp"
#include "distributed/rendezvous_message.hpp"
#include "relora/distributed/communicator.hpp"
#include "relora/io/atomic_file.hpp"

namespace relora {
namespace {

using rendezvous_detail::Message;
using rendezvous_detail::MessageKind;

// The file at `path` if it is this job's blob; else nothing, and `seen` says what was there.
bool read_blob(const std::string& path, const std::string& key, int world_size, std::vector<std::uint8_t>& blob,
               std::string& seen) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    seen = errno == ENOENT ? "no file yet" : "the file cannot be opened";
    return false;
  }
  std::fclose(file);
  std::vector<std::uint8_t> bytes;
  try {
    bytes = read_file_bytes(path);
  } catch (const IoError& e) {
    seen = e.what();
    return false;
  }
  Message message;
  const std::string why = rendezvous_detail::decode_message(bytes, message);
  if (!why.empty()) {
    seen = "a file that is not a rendezvous blob: " + why;
    return false;
  }
  if (message.kind != MessageKind::blob || message.key != key) {
    seen = "a file left by another job (job key '" + message.key + "', this job's is '" + key + "')";
    return false;
  }
  if (message.world_size != static_cast<std::uint32_t>(world_size)) {
    seen = "a file of this job key for " + std::to_string(message.world_size) + " ranks, this job has " +
           std::to_string(world_size);
    return false;
  }
  blob = std::move(message.payload);
  return true;
}

}  // namespace

FileRendezvous::FileRendezvous(std::string path, int rank, int world_size, std::string job_key,
                               std::chrono::milliseconds timeout)
    : path_(std::move(path)), rank_(rank), world_size_(world_size), job_key_(std::move(job_key)), timeout_(timeout) {
  if (path_.empty()) throw ConfigError("file rendezvous: the path is empty");
  rendezvous_detail::check_rendezvous_arguments("file rendezvous " + path_, rank_, world_size_, job_key_, timeout_);
}

std::vector<std::uint8_t> FileRendezvous::share_from_rank0(const std::vector<std::uint8_t>& blob) {
  if (rank_ == 0) {
    rendezvous_detail::check_blob(description(), blob);
    Message message;
    message.kind = MessageKind::blob;
    message.world_size = static_cast<std::uint32_t>(world_size_);
    message.key = job_key_;
    message.payload = blob;
    try {
      write_file_atomically(path_, rendezvous_detail::encode_message(message));
    } catch (const IoError& e) {
      throw CommunicatorError("file rendezvous: rank 0 cannot publish its blob: " + std::string(e.what()));
    }
    return blob;
  }
  // Polls quickly at first (rank 0 usually writes within milliseconds), then every 100 ms, so that
  // many ranks on a network file system do not hammer its metadata server.
  const auto start = std::chrono::steady_clock::now();
  auto pause = std::chrono::milliseconds(2);
  std::string seen;
  std::vector<std::uint8_t> found;
  for (;;) {
    if (read_blob(path_, job_key_, world_size_, found, seen)) return found;
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited >= timeout_) {
      throw CommunicatorError("file rendezvous: rank " + std::to_string(rank_) + " waited " +
                              rendezvous_detail::seconds_text(waited) + " for rank 0's blob at " + path_ +
                              " and found " + seen);
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(timeout_ - waited);
    std::this_thread::sleep_for(std::min(pause, left + std::chrono::milliseconds(1)));
    pause = std::min(pause * 2, std::chrono::milliseconds(100));
  }
}

}  // namespace relora
