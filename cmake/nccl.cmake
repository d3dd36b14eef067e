# NCCL, for the NCCL communicator (multi-GPU data-parallel training). Needs the CUDA backend.
# RELORA_NCCL=AUTO builds it where nccl.h and libnccl (2.13 or later) are found: in NCCL_ROOT or
# NCCL_HOME (CMake variable or environment), beside the CUDA toolkit, or in the system's
# directories. Without it (or with OFF) the library builds as before and make_nccl_communicator
# explains why it fails. Sources in lib/**/nccl/ folders are built only with NCCL.
set(RELORA_NCCL AUTO CACHE STRING "Build the NCCL communicator: AUTO (when CUDA and NCCL are found), ON or OFF")
set_property(CACHE RELORA_NCCL PROPERTY STRINGS AUTO ON OFF)
set(RELORA_WITH_NCCL OFF)

function(relora_nccl_not_found why)
  if(RELORA_NCCL STREQUAL "ON")
    message(FATAL_ERROR "RELORA_NCCL=ON but ${why}")
  endif()
  message(STATUS "relora: NCCL communicator OFF (${why})")
endfunction()

if(RELORA_NCCL STREQUAL "OFF")
  message(STATUS "relora: NCCL communicator OFF (RELORA_NCCL=OFF)")
elseif(NOT RELORA_WITH_CUDA)
  relora_nccl_not_found("the CUDA backend is not built")
else()
  set(nccl_hints ${NCCL_ROOT} ${NCCL_HOME} $ENV{NCCL_ROOT} $ENV{NCCL_HOME} ${CUDAToolkit_LIBRARY_ROOT}
      ${CUDAToolkit_TARGET_DIR})
  find_path(RELORA_NCCL_INCLUDE_DIR nccl.h HINTS ${nccl_hints} ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
  find_library(RELORA_NCCL_LIBRARY nccl HINTS ${nccl_hints} ${CUDAToolkit_LIBRARY_DIR} PATH_SUFFIXES lib lib64)
  if(NOT RELORA_NCCL_INCLUDE_DIR OR NOT RELORA_NCCL_LIBRARY)
    relora_nccl_not_found("nccl.h or libnccl was not found (set NCCL_ROOT)")
  else()
    file(STRINGS ${RELORA_NCCL_INCLUDE_DIR}/nccl.h nccl_version_lines REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) ")
    string(REGEX REPLACE ".*NCCL_MAJOR ([0-9]+).*" "\\1" nccl_major "${nccl_version_lines}")
    string(REGEX REPLACE ".*NCCL_MINOR ([0-9]+).*" "\\1" nccl_minor "${nccl_version_lines}")
    string(REGEX REPLACE ".*NCCL_PATCH ([0-9]+).*" "\\1" nccl_patch "${nccl_version_lines}")
    set(RELORA_NCCL_VERSION "${nccl_major}.${nccl_minor}.${nccl_patch}")
    # 2.13: ncclGetLastError, which every error message quotes (ncclRedOpCreatePreMulSum is 2.11).
    if(RELORA_NCCL_VERSION VERSION_LESS 2.13)
      relora_nccl_not_found("NCCL ${RELORA_NCCL_VERSION} in ${RELORA_NCCL_INCLUDE_DIR} is older than 2.13")
    else()
      set(RELORA_WITH_NCCL ON)
      message(STATUS "relora: NCCL communicator ON (NCCL ${RELORA_NCCL_VERSION}: ${RELORA_NCCL_LIBRARY})")
    endif()
  endif()
endif()

function(relora_add_nccl_sources target)
  if(NOT RELORA_WITH_NCCL)
    return()
  endif()
  file(GLOB_RECURSE nccl_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/lib/*.cu ${PROJECT_SOURCE_DIR}/lib/*.cpp)
  list(FILTER nccl_sources INCLUDE REGEX "/nccl/[^/]*$")
  target_sources(${target} PRIVATE ${nccl_sources})
  target_compile_definitions(${target} PRIVATE RELORA_WITH_NCCL=1)
  target_include_directories(${target} SYSTEM PRIVATE ${RELORA_NCCL_INCLUDE_DIR})
  # By path, not through an imported target: the installed package then needs no NCCL module to
  # find it again (the path is the one this build linked).
  target_link_libraries(${target} PRIVATE ${RELORA_NCCL_LIBRARY})
endfunction()
