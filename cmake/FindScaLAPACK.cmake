# FindScaLAPACK: ScaLAPACK + BLACS for Open MPI through pkg-config (scalapack-openmpi).
# Creates the imported target ScaLAPACK::ScaLAPACK.
find_package(PkgConfig REQUIRED)
pkg_check_modules(PC_SCALAPACK QUIET IMPORTED_TARGET scalapack-openmpi)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(ScaLAPACK REQUIRED_VARS PC_SCALAPACK_FOUND
                                  VERSION_VAR PC_SCALAPACK_VERSION)
if(ScaLAPACK_FOUND AND NOT TARGET ScaLAPACK::ScaLAPACK)
  add_library(ScaLAPACK::ScaLAPACK INTERFACE IMPORTED)
  target_link_libraries(ScaLAPACK::ScaLAPACK INTERFACE PkgConfig::PC_SCALAPACK)
endif()
