#include "relora/distributed/launch_environment.hpp"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <system_error>

#include "relora/core/errors.hpp"

namespace relora {
namespace {

// The variable names of one launcher, in the order rank, world size, local rank, local world size
// (the last one may be absent from the launcher's set: "").
struct LauncherVariables {
  const char* launcher;
  const char* rank;
  const char* world_size;
  const char* local_rank;
  const char* local_world_size;
};

constexpr LauncherVariables kLaunchers[] = {
    {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
    {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"},
    // Before Slurm's: mpiexec inside an allocation starts its proxies through srun, so every
    // process sees a proxy's SLURM_PROCID; under srun's own PMI both agree.
    {"mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},  // MPICH's Hydra, Intel MPI
    {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", ""},
};

// Every variable this file reads, for launch_environment_from_process.
constexpr const char* kOtherVariables[] = {
    "RELORA_RENDEZVOUS_FILE", "MASTER_ADDR",    "MASTER_PORT",   "RELORA_RENDEZVOUS_KEY",
    "TORCHELASTIC_RUN_ID",    "TORCHELASTIC_RESTART_COUNT",     "SLURM_JOB_ID",
    "SLURM_STEP_ID",          "PMIX_NAMESPACE", "RELORA_RENDEZVOUS_TIMEOUT",
    "RELORA_RENDEZVOUS_PORT", "TORCHELASTIC_USE_AGENT_STORE",
};

std::optional<std::string> lookup(const EnvironmentVariables& variables, const char* name) {
  if (name == nullptr || *name == '\0') return std::nullopt;
  const auto found = variables.find(name);
  if (found == variables.end()) return std::nullopt;
  return found->second;
}

[[noreturn]] void throw_bad(const char* name, const std::string& value, const std::string& why) {
  throw ConfigError(std::string("launch environment: ") + name + "='" + value + "' " + why);
}

// A whole decimal integer in [minimum, maximum]; no sign other than a leading '-', no spaces.
int parse_integer(const char* name, const std::string& value, int minimum, int maximum) {
  long long parsed = 0;
  const char* begin = value.data();
  const char* end = value.data() + value.size();
  const auto [stop, error] = std::from_chars(begin, end, parsed);
  if (value.empty() || error == std::errc::invalid_argument || stop != end) {
    throw_bad(name, value, "is not an integer");
  }
  if (error == std::errc::result_out_of_range) throw_bad(name, value, "is out of range");
  if (parsed < 0 && minimum >= 0) throw_bad(name, value, "is negative");
  if (parsed < minimum || parsed > maximum) {
    throw_bad(name, value, "must be in [" + std::to_string(minimum) + ", " + std::to_string(maximum) + "]");
  }
  return static_cast<int>(parsed);
}

// The first launcher whose rank variable is set, or none.
const LauncherVariables* find_launcher(const EnvironmentVariables& variables) {
  for (const LauncherVariables& launcher : kLaunchers) {
    if (lookup(variables, launcher.rank)) return &launcher;
  }
  return nullptr;
}

void read_ranks(const EnvironmentVariables& variables, const LauncherVariables& names, LaunchEnvironment& env) {
  constexpr int kMax = std::numeric_limits<int>::max();
  const std::optional<std::string> world = lookup(variables, names.world_size);
  if (!world) {
    throw ConfigError(std::string("launch environment: ") + names.rank + " is set but " + names.world_size +
                      " is not");
  }
  env.launcher = names.launcher;
  env.rank = parse_integer(names.rank, *lookup(variables, names.rank), 0, kMax);
  env.world_size = parse_integer(names.world_size, *world, 1, kMax);
  if (env.rank >= env.world_size) {
    throw_bad(names.rank, std::to_string(env.rank),
              std::string("must be below ") + names.world_size + "=" + std::to_string(env.world_size));
  }
  // Without a local rank, the ranks are taken to share one node.
  const std::optional<std::string> local_rank = lookup(variables, names.local_rank);
  env.local_rank = local_rank ? parse_integer(names.local_rank, *local_rank, 0, kMax) : env.rank;
  if (const std::optional<std::string> local_world = lookup(variables, names.local_world_size)) {
    env.local_world_size = parse_integer(names.local_world_size, *local_world, 1, env.world_size);
    if (env.local_rank >= env.local_world_size) {
      throw_bad(names.local_rank, std::to_string(env.local_rank),
                std::string("must be below ") + names.local_world_size + "=" + std::to_string(env.local_world_size));
    }
  } else if (env.local_rank >= env.world_size) {
    throw_bad(names.local_rank, std::to_string(env.local_rank),
              std::string("must be below ") + names.world_size + "=" + std::to_string(env.world_size));
  }
}

// RELORA_RENDEZVOUS_KEY, else the launcher's id of this job (and of this restart, or job step, so
// that a restarted job does not take the blob its previous attempt left).
std::string read_job_key(const EnvironmentVariables& variables) {
  if (auto key = lookup(variables, "RELORA_RENDEZVOUS_KEY")) return *key;
  if (auto run = lookup(variables, "TORCHELASTIC_RUN_ID")) {
    return "torchelastic:" + *run + "/" + lookup(variables, "TORCHELASTIC_RESTART_COUNT").value_or("0");
  }
  if (auto job = lookup(variables, "SLURM_JOB_ID")) {
    return "slurm:" + *job + "." + lookup(variables, "SLURM_STEP_ID").value_or("");
  }
  if (auto space = lookup(variables, "PMIX_NAMESPACE")) return "pmix:" + *space;
  return "";
}

void read_rendezvous(const EnvironmentVariables& variables, LaunchEnvironment& env) {
  const std::optional<std::string> file = lookup(variables, "RELORA_RENDEZVOUS_FILE");
  const std::optional<std::string> addr = lookup(variables, "MASTER_ADDR");
  const std::optional<std::string> port = lookup(variables, "MASTER_PORT");
  env.job_key = read_job_key(variables);
  if (const auto timeout = lookup(variables, "RELORA_RENDEZVOUS_TIMEOUT")) {
    char* stop = nullptr;
    const double seconds = std::strtod(timeout->c_str(), &stop);
    if (timeout->empty() || stop != timeout->c_str() + timeout->size() || !std::isfinite(seconds) || seconds <= 0) {
      throw_bad("RELORA_RENDEZVOUS_TIMEOUT", *timeout, "must be a positive number of seconds");
    }
    env.rendezvous_timeout_seconds = seconds;
  }
  if (file) {
    if (file->empty()) throw_bad("RELORA_RENDEZVOUS_FILE", *file, "is empty");
    env.rendezvous = RendezvousKind::file;
    env.rendezvous_file = *file;
    if (env.world_size > 1 && env.job_key.empty()) {
      throw ConfigError("launch environment: the file rendezvous RELORA_RENDEZVOUS_FILE='" + *file + "' of " +
                        std::to_string(env.world_size) +
                        " ranks needs a job key, so that a file left by an earlier job is not taken: set "
                        "RELORA_RENDEZVOUS_KEY to a value unique to this job (no launcher's job id was found)");
    }
    return;
  }
  const std::optional<std::string> own_port = lookup(variables, "RELORA_RENDEZVOUS_PORT");
  if (own_port && !addr) {
    throw ConfigError("launch environment: RELORA_RENDEZVOUS_PORT='" + *own_port + "' is set but MASTER_ADDR is not");
  }
  if (addr || port) {
    if (!port && !own_port) {
      throw ConfigError("launch environment: MASTER_ADDR='" + *addr + "' is set but MASTER_PORT is not");
    }
    if (!addr) throw ConfigError("launch environment: MASTER_PORT='" + *port + "' is set but MASTER_ADDR is not");
    if (addr->empty()) throw_bad("MASTER_ADDR", *addr, "is empty");
    env.rendezvous = RendezvousKind::tcp;
    env.master_addr = *addr;
    if (own_port) {
      env.master_port = parse_integer("RELORA_RENDEZVOUS_PORT", *own_port, 1, 65535);
      return;
    }
    // torchrun's agent may serve its own store on MASTER_PORT, and says so: rank 0 of several
    // could not listen there (one rank does not listen).
    if (env.world_size > 1 && lookup(variables, "TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True") {
      throw ConfigError("launch environment: MASTER_PORT=" + *port +
                        " is torchrun's own store (TORCHELASTIC_USE_AGENT_STORE=True), where relora's rank 0 cannot "
                        "listen: set RELORA_RENDEZVOUS_PORT to a free port on MASTER_ADDR=" + *addr +
                        ", or RELORA_RENDEZVOUS_FILE to a path every rank sees");
    }
    env.master_port = parse_integer("MASTER_PORT", *port, 1, 65535);
    return;
  }
  if (env.world_size > 1) {
    throw ConfigError("launch environment: world size " + std::to_string(env.world_size) + " (" + env.launcher +
                      ") but no rendezvous: set MASTER_ADDR and MASTER_PORT (or RELORA_RENDEZVOUS_PORT), or "
                      "RELORA_RENDEZVOUS_FILE");
  }
}

}  // namespace

const char* rendezvous_kind_name(RendezvousKind kind) {
  switch (kind) {
    case RendezvousKind::file:
      return "file";
    case RendezvousKind::tcp:
      return "tcp";
    case RendezvousKind::none:
      break;
  }
  return "none";
}

std::string LaunchEnvironment::description() const {
  std::string text = "rank " + std::to_string(rank) + " of " + std::to_string(world_size) + " (local " +
                     std::to_string(local_rank);
  if (local_world_size > 0) text += " of " + std::to_string(local_world_size);
  text += ", " + launcher + ")";
  if (rendezvous == RendezvousKind::file) text += ", file rendezvous at " + rendezvous_file;
  if (rendezvous == RendezvousKind::tcp) {
    text += ", tcp rendezvous at " + master_addr + ":" + std::to_string(master_port);
  }
  return text;
}

LaunchEnvironment parse_launch_environment(const EnvironmentVariables& variables) {
  LaunchEnvironment env;
  if (const LauncherVariables* launcher = find_launcher(variables)) read_ranks(variables, *launcher, env);
  read_rendezvous(variables, env);
  return env;
}

LaunchEnvironment launch_environment_from_process() {
  EnvironmentVariables variables;
  const auto take = [&variables](const char* name) {
    if (name == nullptr || *name == '\0') return;
    if (const char* value = std::getenv(name)) variables[name] = value;
  };
  for (const LauncherVariables& launcher : kLaunchers) {
    take(launcher.rank);
    take(launcher.world_size);
    take(launcher.local_rank);
    take(launcher.local_world_size);
  }
  for (const char* name : kOtherVariables) take(name);
  return parse_launch_environment(variables);
}

}  // namespace relora
