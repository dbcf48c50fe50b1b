#pragma once
// PETSc log events for gradmap's phases, so that `PETSC_OPTIONS=-log_view mpirun ... gradmap ...`
// prints a profile (time, calls, flops per event, over ranks). PETSc stays out of this header.
#include <string>

namespace gradmap {

/// Not collective. An event registered once by name (PetscLogEventRegister) and timed by scope;
/// add_flops() credits floating-point work to it (PetscLogFlops).
class ProfileEvent {
public:
  explicit ProfileEvent(const std::string& name);
  ~ProfileEvent();
  ProfileEvent(const ProfileEvent&) = delete;
  ProfileEvent& operator=(const ProfileEvent&) = delete;
  static void add_flops(double flops);

private:
  int id_;
};

} // namespace gradmap
