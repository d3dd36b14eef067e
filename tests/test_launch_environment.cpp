// The launch environment as torchrun, mpirun and srun give it: ranks, local ranks, the rendezvous
// and the job key read from an injected map of variables, and every bad value refused with a
// message that names the variable and the value.
#include <doctest/doctest.h>
#include <stdlib.h>

#include <optional>
#include <string>

#include "relora/core/errors.hpp"
#include "relora/distributed/launch_environment.hpp"

using namespace relora;

namespace {

std::string error_of(const EnvironmentVariables& variables) {
  try {
    (void)parse_launch_environment(variables);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no ConfigError)";
}

}  // namespace

TEST_CASE("launch environment: no launcher means one rank and no rendezvous") {
  const LaunchEnvironment env = parse_launch_environment({});
  CHECK(env.rank == 0);
  CHECK(env.world_size == 1);
  CHECK(env.local_rank == 0);
  CHECK(env.local_world_size == 0);
  CHECK(env.launcher == "none");
  CHECK(env.rendezvous == RendezvousKind::none);
  CHECK(env.rendezvous_timeout_seconds == 300);
}

TEST_CASE("launch environment: torchrun's variables and a TCP rendezvous") {
  const LaunchEnvironment env = parse_launch_environment({{"RANK", "3"},
                                                          {"WORLD_SIZE", "8"},
                                                          {"LOCAL_RANK", "1"},
                                                          {"LOCAL_WORLD_SIZE", "2"},
                                                          {"MASTER_ADDR", "node0"},
                                                          {"MASTER_PORT", "29500"},
                                                          {"TORCHELASTIC_RUN_ID", "job7"},
                                                          {"TORCHELASTIC_RESTART_COUNT", "2"}});
  CHECK(env.launcher == "torchrun");
  CHECK(env.rank == 3);
  CHECK(env.world_size == 8);
  CHECK(env.local_rank == 1);
  CHECK(env.local_world_size == 2);
  CHECK(env.rendezvous == RendezvousKind::tcp);
  CHECK(env.master_addr == "node0");
  CHECK(env.master_port == 29500);
  // A restart of the same run is another job as far as the rendezvous goes.
  CHECK(env.job_key == "torchelastic:job7/2");
  CHECK(env.description() == "rank 3 of 8 (local 1 of 2, torchrun), tcp rendezvous at node0:29500");
}

TEST_CASE("launch environment: Open MPI and Slurm variables when torchrun's are absent") {
  const LaunchEnvironment mpi = parse_launch_environment({{"OMPI_COMM_WORLD_RANK", "5"},
                                                          {"OMPI_COMM_WORLD_SIZE", "6"},
                                                          {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
                                                          {"OMPI_COMM_WORLD_LOCAL_SIZE", "3"},
                                                          {"PMIX_NAMESPACE", "prterun-x-1@1"},
                                                          {"RELORA_RENDEZVOUS_FILE", "/shared/id"}});
  CHECK(mpi.launcher == "openmpi");
  CHECK(mpi.rank == 5);
  CHECK(mpi.world_size == 6);
  CHECK(mpi.local_rank == 2);
  CHECK(mpi.local_world_size == 3);
  CHECK(mpi.rendezvous == RendezvousKind::file);
  CHECK(mpi.rendezvous_file == "/shared/id");
  CHECK(mpi.job_key == "pmix:prterun-x-1@1");

  const LaunchEnvironment slurm = parse_launch_environment({{"SLURM_PROCID", "1"},
                                                            {"SLURM_NTASKS", "4"},
                                                            {"SLURM_LOCALID", "1"},
                                                            {"SLURM_JOB_ID", "991"},
                                                            {"SLURM_STEP_ID", "0"},
                                                            {"MASTER_ADDR", "10.0.0.1"},
                                                            {"MASTER_PORT", "1234"}});
  CHECK(slurm.launcher == "slurm");
  CHECK(slurm.rank == 1);
  CHECK(slurm.world_size == 4);
  CHECK(slurm.local_rank == 1);
  CHECK(slurm.local_world_size == 0);
  CHECK(slurm.job_key == "slurm:991.0");
  CHECK(slurm.rendezvous == RendezvousKind::tcp);

  // torchrun's variables win over Slurm's (torchrun started inside an allocation).
  const LaunchEnvironment both = parse_launch_environment({{"RANK", "0"},
                                                           {"WORLD_SIZE", "1"},
                                                           {"SLURM_PROCID", "3"},
                                                           {"SLURM_NTASKS", "4"}});
  CHECK(both.launcher == "torchrun");
  CHECK(both.world_size == 1);
}

TEST_CASE("launch environment: MPICH's and Intel MPI's variables") {
  const LaunchEnvironment env = parse_launch_environment({{"PMI_RANK", "3"},
                                                          {"PMI_SIZE", "4"},
                                                          {"MPI_LOCALRANKID", "1"},
                                                          {"MPI_LOCALNRANKS", "2"},
                                                          {"MASTER_ADDR", "node0"},
                                                          {"MASTER_PORT", "29500"}});
  CHECK(env.launcher == "mpich");
  CHECK(env.rank == 3);
  CHECK(env.world_size == 4);
  CHECK(env.local_rank == 1);
  CHECK(env.local_world_size == 2);
  // mpiexec inside a Slurm allocation: every process sees its proxy's SLURM_PROCID, and PMI_RANK is
  // the rank (under srun's own PMI the two agree).
  const LaunchEnvironment in_slurm = parse_launch_environment(
      {{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"PMI_RANK", "5"}, {"PMI_SIZE", "8"},
       {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29500"}});
  CHECK(in_slurm.launcher == "mpich");
  CHECK(in_slurm.rank == 5);
  CHECK(error_of({{"PMI_RANK", "0"}, {"PMI_SIZE", "2"}, {"MPI_LOCALRANKID", "2"}, {"MPI_LOCALNRANKS", "2"},
                  {"MASTER_ADDR", "a"}, {"MASTER_PORT", "1"}}) ==
        "launch environment: MPI_LOCALRANKID='2' must be below MPI_LOCALNRANKS=2");
}

TEST_CASE("launch environment: torchrun's agent store on MASTER_PORT, and RELORA_RENDEZVOUS_PORT") {
  const EnvironmentVariables torchrun{{"RANK", "1"},
                                      {"WORLD_SIZE", "2"},
                                      {"MASTER_ADDR", "127.0.0.1"},
                                      {"MASTER_PORT", "29500"},
                                      {"TORCHELASTIC_RUN_ID", "run"},
                                      {"TORCHELASTIC_USE_AGENT_STORE", "True"}};
  // The agent listens on MASTER_PORT already: refused, naming both ways out.
  CHECK(error_of(torchrun) ==
        "launch environment: MASTER_PORT=29500 is torchrun's own store (TORCHELASTIC_USE_AGENT_STORE=True), where "
        "relora's rank 0 cannot listen: set RELORA_RENDEZVOUS_PORT to a free port on MASTER_ADDR=127.0.0.1, or "
        "RELORA_RENDEZVOUS_FILE to a path every rank sees");
  EnvironmentVariables own = torchrun;
  own["RELORA_RENDEZVOUS_PORT"] = "29611";
  const LaunchEnvironment env = parse_launch_environment(own);
  CHECK(env.rendezvous == RendezvousKind::tcp);
  CHECK(env.master_addr == "127.0.0.1");
  CHECK(env.master_port == 29611);
  EnvironmentVariables file = torchrun;
  file["RELORA_RENDEZVOUS_FILE"] = "/tmp/id";
  CHECK(parse_launch_environment(file).rendezvous == RendezvousKind::file);
  // Without the agent's store (an older torchrun, or the store not shared) MASTER_PORT is free to take.
  EnvironmentVariables legacy = torchrun;
  legacy["TORCHELASTIC_USE_AGENT_STORE"] = "False";
  CHECK(parse_launch_environment(legacy).master_port == 29500);
  legacy.erase("TORCHELASTIC_USE_AGENT_STORE");
  CHECK(parse_launch_environment(legacy).master_port == 29500);
  // One rank does not listen: torchrun's variables are taken as they are.
  EnvironmentVariables one = torchrun;
  one["RANK"] = "0";
  one["WORLD_SIZE"] = "1";
  CHECK(parse_launch_environment(one).master_port == 29500);
  // RELORA_RENDEZVOUS_PORT needs no MASTER_PORT.
  const LaunchEnvironment alone =
      parse_launch_environment({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "node0"}, {"RELORA_RENDEZVOUS_PORT", "4000"}});
  CHECK(alone.master_port == 4000);
}

TEST_CASE("launch environment: the file rendezvous wins over MASTER_ADDR, and its key") {
  const LaunchEnvironment env = parse_launch_environment({{"RANK", "1"},
                                                          {"WORLD_SIZE", "2"},
                                                          {"MASTER_ADDR", "node0"},
                                                          {"MASTER_PORT", "29500"},
                                                          {"RELORA_RENDEZVOUS_FILE", "/tmp/x"},
                                                          {"RELORA_RENDEZVOUS_KEY", "mine"},
                                                          {"SLURM_JOB_ID", "5"},
                                                          {"RELORA_RENDEZVOUS_TIMEOUT", "2.5"}});
  CHECK(env.rendezvous == RendezvousKind::file);
  CHECK(env.job_key == "mine");
  CHECK(env.rendezvous_timeout_seconds == 2.5);
  CHECK(env.local_rank == 1);  // no LOCAL_RANK: one node assumed
}

TEST_CASE("launch environment: bad values name the variable and the value") {
  CHECK(error_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}}) == "launch environment: RANK='x' is not an integer");
  CHECK(error_of({{"RANK", "1.5"}, {"WORLD_SIZE", "2"}}) == "launch environment: RANK='1.5' is not an integer");
  CHECK(error_of({{"RANK", " 1"}, {"WORLD_SIZE", "2"}}) == "launch environment: RANK=' 1' is not an integer");
  CHECK(error_of({{"RANK", ""}, {"WORLD_SIZE", "2"}}) == "launch environment: RANK='' is not an integer");
  CHECK(error_of({{"RANK", "-1"}, {"WORLD_SIZE", "2"}}) == "launch environment: RANK='-1' is negative");
  CHECK(error_of({{"RANK", "0"}, {"WORLD_SIZE", "0"}}) ==
        "launch environment: WORLD_SIZE='0' must be in [1, 2147483647]");
  CHECK(error_of({{"RANK", "0"}, {"WORLD_SIZE", "99999999999"}}) ==
        "launch environment: WORLD_SIZE='99999999999' must be in [1, 2147483647]");
  CHECK(error_of({{"RANK", "4"}, {"WORLD_SIZE", "4"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "1"}}) ==
        "launch environment: RANK='4' must be below WORLD_SIZE=4");
  CHECK(error_of({{"RANK", "0"}}) == "launch environment: RANK is set but WORLD_SIZE is not");
  CHECK(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "-3"}}) ==
        "launch environment: SLURM_LOCALID='-3' is negative");
  CHECK(error_of({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                  {"OMPI_COMM_WORLD_LOCAL_RANK", "2"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}}) ==
        "launch environment: OMPI_COMM_WORLD_LOCAL_RANK='2' must be below OMPI_COMM_WORLD_LOCAL_SIZE=2");
  CHECK(error_of({{"MASTER_ADDR", "node0"}, {"MASTER_PORT", "70000"}}) ==
        "launch environment: MASTER_PORT='70000' must be in [1, 65535]");
  CHECK(error_of({{"MASTER_ADDR", "node0"}, {"MASTER_PORT", "0"}}) ==
        "launch environment: MASTER_PORT='0' must be in [1, 65535]");
  CHECK(error_of({{"MASTER_ADDR", "node0"}, {"MASTER_PORT", "http"}}) ==
        "launch environment: MASTER_PORT='http' is not an integer");
  CHECK(error_of({{"MASTER_ADDR", "node0"}}) ==
        "launch environment: MASTER_ADDR='node0' is set but MASTER_PORT is not");
  CHECK(error_of({{"MASTER_PORT", "29500"}}) ==
        "launch environment: MASTER_PORT='29500' is set but MASTER_ADDR is not");
  CHECK(error_of({{"RELORA_RENDEZVOUS_TIMEOUT", "0"}}) ==
        "launch environment: RELORA_RENDEZVOUS_TIMEOUT='0' must be a positive number of seconds");
  CHECK(error_of({{"RELORA_RENDEZVOUS_TIMEOUT", "soon"}}) ==
        "launch environment: RELORA_RENDEZVOUS_TIMEOUT='soon' must be a positive number of seconds");
  CHECK(error_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}}) ==
        "launch environment: world size 2 (torchrun) but no rendezvous: set MASTER_ADDR and MASTER_PORT (or "
        "RELORA_RENDEZVOUS_PORT), or RELORA_RENDEZVOUS_FILE");
  CHECK(error_of({{"RELORA_RENDEZVOUS_PORT", "29600"}}) ==
        "launch environment: RELORA_RENDEZVOUS_PORT='29600' is set but MASTER_ADDR is not");
  CHECK(error_of({{"MASTER_ADDR", "node0"}, {"RELORA_RENDEZVOUS_PORT", "0"}}) ==
        "launch environment: RELORA_RENDEZVOUS_PORT='0' must be in [1, 65535]");
  CHECK(doctest::String(error_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"RELORA_RENDEZVOUS_FILE", "/tmp/id"}}).c_str()) ==
        doctest::Contains("RELORA_RENDEZVOUS_FILE='/tmp/id' of 2 ranks needs a job key"));
  // One rank needs neither a rendezvous nor a key.
  CHECK_NOTHROW(parse_launch_environment({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"RELORA_RENDEZVOUS_FILE", "/tmp/id"}}));
}

TEST_CASE("launch environment: read from the process's own environment") {
  // Only a variable that no launcher sets is changed here, and put back afterwards.
  const char* before = std::getenv("RELORA_RENDEZVOUS_TIMEOUT");
  const std::optional<std::string> saved = before ? std::optional<std::string>(before) : std::nullopt;
  ::setenv("RELORA_RENDEZVOUS_TIMEOUT", "7", 1);
  const LaunchEnvironment env = launch_environment_from_process();
  if (saved) {
    ::setenv("RELORA_RENDEZVOUS_TIMEOUT", saved->c_str(), 1);
  } else {
    ::unsetenv("RELORA_RENDEZVOUS_TIMEOUT");
  }
  CHECK(env.rendezvous_timeout_seconds == 7);
}
