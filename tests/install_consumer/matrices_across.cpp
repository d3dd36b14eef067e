// Eigen matrices that cross between the installed library and this program: Model::predict
// allocates its result inside the library, this program resizes and frees it. Built as C++17
// (the standard the public headers need) and, in .ci/run, with -march=native while the library
// is built without it: Eigen's heap blocks must be allocated and freed by matching functions
// whatever instruction set each side was compiled for (EIGEN_MAX_ALIGN_BYTES on relora::relora).
#include <relora/relora.hpp>

#include <iostream>

int main() {
  using namespace relora;
  auto backend = make_backend<float>(Device::cpu);
  Model<float> model(backend);
  LoraConfig config;
  config.in_features = 16;
  config.out_features = 8;
  config.rank = 2;
  config.alpha = 2;
  model.add(config, Activation::identity, HostMatrix<float>::Random(8, 16), "proj");
  const HostMatrix<float> X = HostMatrix<float>::Random(64, 16);
  for (int i = 0; i < 4; ++i) {
    HostMatrix<float> Y = model.predict(X);  // allocated by the library
    if (Y.rows() != 64 || Y.cols() != 8) return 1;
    Y.resize(128, 32);                       // freed and allocated again here
    Y.setZero();
  }
  std::cout << "matrices allocated by relora and freed here: ok (Eigen alignment " << EIGEN_MAX_ALIGN_BYTES
            << " bytes)\n";
  return 0;
}
