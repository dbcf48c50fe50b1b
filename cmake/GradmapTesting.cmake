# add_mpi_test(NAME <name> COMMAND <exe> [args...] RANKS <n>... [LABELS ...])
# Registers one CTest test per rank count, named <name>.np<n>, run through mpiexec with
# PROCESSORS set so that `ctest -j` does not oversubscribe the machine.
set(GRADMAP_MPIEXEC_FLAGS "" CACHE STRING "Extra flags for mpiexec in tests")
set(_gm_mpi_flags ${MPIEXEC_PREFLAGS} ${GRADMAP_MPIEXEC_FLAGS})
execute_process(COMMAND id -u OUTPUT_VARIABLE _gm_uid OUTPUT_STRIP_TRAILING_WHITESPACE)
if(_gm_uid STREQUAL "0")
  list(APPEND _gm_mpi_flags --allow-run-as-root) # Open MPI refuses root without it
endif()
list(APPEND _gm_mpi_flags --oversubscribe)

function(add_mpi_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "COMMAND;RANKS;LABELS" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  foreach(n IN LISTS T_RANKS)
    add_test(NAME ${T_NAME}.np${n}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${n} ${_gm_mpi_flags} ${T_COMMAND})
    set_tests_properties(${T_NAME}.np${n} PROPERTIES PROCESSORS ${n} TIMEOUT ${T_TIMEOUT}
      LABELS "mpi;${T_LABELS}"
      ENVIRONMENT "OMPI_MCA_rmaps_base_oversubscribe=1;OPENBLAS_NUM_THREADS=1;OMP_NUM_THREADS=1")
  endforeach()
endfunction()
