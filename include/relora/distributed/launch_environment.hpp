#pragma once
// Where this process stands in a multi-process launch: its rank, the number of ranks, its place on
// its node, and how the ranks meet to exchange the one small blob a communicator needs (NCCL's
// unique id). Read from the variables the usual launchers set, first found wins:
//
//   torchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
//   mpirun     OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK,
//              OMPI_COMM_WORLD_LOCAL_SIZE (Open MPI)
//   mpiexec    PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS (MPICH's Hydra, Intel MPI)
//   srun       SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
//   (none)     one process: rank 0 of 1
//
// How the ranks meet (needed when the world has more than one rank):
//   RELORA_RENDEZVOUS_FILE   a path on a file system every rank sees; rank 0 writes the blob there.
//                            Taken before MASTER_ADDR when both are set.
//   MASTER_ADDR, MASTER_PORT rank 0 serves the blob over TCP on MASTER_PORT; the others connect to
//                            MASTER_ADDR (an IPv4 address or a host name).
//   RELORA_RENDEZVOUS_PORT   the port to take instead of MASTER_PORT (with MASTER_ADDR). Needed under
//                            torchrun where its agent serves its own store on MASTER_PORT and
//                            says so (TORCHELASTIC_USE_AGENT_STORE=True), where rank 0 could not
//                            listen: a world of more than one rank is then refused with a
//                            message naming both ways out.
// The job key (RELORA_RENDEZVOUS_KEY, else one the launcher gives: TORCHELASTIC_RUN_ID with
// TORCHELASTIC_RESTART_COUNT, SLURM_JOB_ID with SLURM_STEP_ID, PMIX_NAMESPACE) tells this job's
// blob from an earlier job's: a rendezvous file written under another key is not taken, and a TCP
// peer with another key is refused. The file rendezvous of more than one rank needs a key.
// RELORA_RENDEZVOUS_TIMEOUT: seconds a rank waits for the others (default 300).
#include <map>
#include <string>

namespace relora {

enum class RendezvousKind {
  none,  // one rank: nothing to exchange
  file,
  tcp,
};

const char* rendezvous_kind_name(RendezvousKind kind);

struct LaunchEnvironment {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;        // the rank's index on its node: the GPU it usually takes
  int local_world_size = 0;  // ranks on this node; 0 when the launcher does not say
  std::string launcher = "none";  // whose variables were read: "torchrun", "openmpi", "slurm", "mpich" or "none"

  RendezvousKind rendezvous = RendezvousKind::none;
  std::string rendezvous_file;  // RendezvousKind::file
  std::string master_addr;      // RendezvousKind::tcp
  int master_port = 0;          // RendezvousKind::tcp, in [1, 65535]
  std::string job_key;          // "" when neither RELORA_RENDEZVOUS_KEY nor a launcher's id is set
  double rendezvous_timeout_seconds = 300;

  // "rank 1 of 4 (local 1 of 2, torchrun), tcp rendezvous at node0:29500"
  std::string description() const;
};

// The environment as a map from variable name to value, so that tests (and programs that take
// their settings from elsewhere) can give it without touching the process's environment.
using EnvironmentVariables = std::map<std::string, std::string>;

// Throws ConfigError naming the variable and its value: not an integer, negative, a rank not below
// its world size, a port outside [1, 65535], a world size above 1 with no rendezvous, a file
// rendezvous of more than one rank with no job key, one of a pair of variables without the other,
// or MASTER_PORT when torchrun's agent serves its store there (RELORA_RENDEZVOUS_PORT not set).
LaunchEnvironment parse_launch_environment(const EnvironmentVariables& variables);

// parse_launch_environment over the variables above, read from this process's environment.
LaunchEnvironment launch_environment_from_process();

}  // namespace relora
