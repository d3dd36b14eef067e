#pragma once
// relora_bench --galore: GaLore's full-rank training step against our full-rank Adam on the
// cases of issue 15 (apps/bench/galore_cases.cpp). Called from relora_bench's main.

namespace relora_bench {

// Whether argv asks for the GaLore cases (its first argument is --galore).
bool galore_requested(int argc, char** argv);
// Runs them with the arguments after --galore; returns the process's exit status.
int run_galore_cases(int argc, char** argv);

}  // namespace relora_bench
