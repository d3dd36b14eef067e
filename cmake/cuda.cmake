# The optional CUDA backend. RELORA_CUDA=AUTO builds it where nvcc is found; without a toolkit
# (or with OFF) the library builds as before and make_backend(Device::cuda) explains why it fails.
include(CheckLanguage)
set(RELORA_WITH_CUDA OFF)
if(NOT RELORA_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      # Machine code for Ampere (A100), Ada (RTX 4090, L40) and Hopper (H100, H200), plus Hopper's
      # PTX, which the driver compiles at load time for later chips. Hopper-only instructions are
      # guarded by __CUDA_ARCH__, so the same build runs on all three. A single architecture
      # (-DCMAKE_CUDA_ARCHITECTURES=90) builds about three times faster.
      set(CMAKE_CUDA_ARCHITECTURES "80-real;89-real;90-real;90-virtual" CACHE STRING
          "CUDA architectures to build for (see cmake/cuda.cmake)")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(RELORA_WITH_CUDA ON)
  elseif(RELORA_CUDA STREQUAL "ON")
    message(FATAL_ERROR "RELORA_CUDA=ON but no CUDA compiler was found")
  endif()
endif()
message(STATUS "relora: CUDA backend ${RELORA_WITH_CUDA}")

function(relora_add_cuda_sources target)
  if(NOT RELORA_WITH_CUDA)
    return()
  endif()
  file(GLOB_RECURSE cuda_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/lib/*.cu ${PROJECT_SOURCE_DIR}/lib/*.cpp)
  list(FILTER cuda_sources INCLUDE REGEX "/cuda/[^/]*$")
  target_sources(${target} PRIVATE ${cuda_sources})
  target_compile_definitions(${target} PRIVATE RELORA_WITH_CUDA=1)
  set_target_properties(${target} PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
  target_link_libraries(${target} PRIVATE CUDA::cublas CUDA::cublasLt CUDA::cusolver CUDA::cudart)
endfunction()
