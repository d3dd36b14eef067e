# cmake --install puts the library, its headers, Eigen's headers and a package config in place,
# so that find_package(relora) and target_link_libraries(... relora::relora) work downstream.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS relora EXPORT reloraTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY include/relora DESTINATION include)
install(DIRECTORY third_party/eigen/Eigen DESTINATION include/relora/third_party/eigen)
install(EXPORT reloraTargets NAMESPACE relora:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/relora)
configure_package_config_file(cmake/reloraConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/reloraConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/relora)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/reloraConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/reloraConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/reloraConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/relora)
