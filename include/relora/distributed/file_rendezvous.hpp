#pragma once
// A rendezvous through a file every rank can read (a shared or network file system, or /tmp for
// ranks on one machine). Rank 0 writes the blob with the job key next to the path and renames it
// into place, so no rank ever reads it half written; the others poll for the path until a file
// with their job key and world size appears, or the timeout passes.
//
// A file left by an earlier job stays where it was (rank 0 cannot know when the last rank has read
// it). It is not taken because it carries that job's key: a reader skips a file of another key,
// and of another world size, and keeps polling for this job's. The key must therefore differ from
// job to job (a launcher's job id does; see launch_environment.hpp); two jobs that share a key and
// a path would take each other's blob.
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "relora/distributed/rendezvous.hpp"

namespace relora {

class FileRendezvous final : public Rendezvous {
 public:
  // Throws ConfigError naming the value: an empty path, a rank outside [0, world_size), a key
  // longer than 4096 bytes, a timeout that is not positive.
  FileRendezvous(std::string path, int rank, int world_size, std::string job_key, std::chrono::milliseconds timeout);

  std::vector<std::uint8_t> share_from_rank0(const std::vector<std::uint8_t>& blob) override;
  std::string description() const override { return "file " + path_; }

 private:
  std::string path_;
  int rank_;
  int world_size_;
  std::string job_key_;
  std::chrono::milliseconds timeout_;
};

}  // namespace relora
