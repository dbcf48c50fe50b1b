# FindPETSc: PETSc through pkg-config (Debian's libpetsc-real-dev ships PETSc.pc).
# Creates the imported target PETSc::PETSc.
find_package(PkgConfig REQUIRED)
pkg_check_modules(PC_PETSC QUIET IMPORTED_TARGET PETSc)
if(NOT PC_PETSC_FOUND)
  pkg_check_modules(PC_PETSC QUIET IMPORTED_TARGET petsc)
endif()
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(PETSc REQUIRED_VARS PC_PETSC_FOUND VERSION_VAR PC_PETSC_VERSION)
if(PETSc_FOUND AND NOT TARGET PETSc::PETSc)
  add_library(PETSc::PETSc INTERFACE IMPORTED)
  target_link_libraries(PETSc::PETSc INTERFACE PkgConfig::PC_PETSC)
  set(PETSc_VERSION ${PC_PETSC_VERSION})
endif()
