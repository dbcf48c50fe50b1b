#include "gradmap/core/profile.hpp"

#include <petsclog.h>
#include <petscsys.h>

#include <map>
#include <mutex>

namespace gradmap {
namespace {
int event_id(const std::string& name) {
  static std::map<std::string, PetscLogEvent> events;
  static PetscClassId cls = 0;
  PetscBool initialised = PETSC_FALSE;
  PetscInitialized(&initialised);
  if (!initialised)
    return -1;
  if (cls == 0)
    PetscClassIdRegister("gradmap", &cls);
  auto it = events.find(name);
  if (it == events.end()) {
    PetscLogEvent e = 0;
    PetscLogEventRegister(name.c_str(), cls, &e);
    it = events.emplace(name, e).first;
  }
  return int(it->second);
}
} // namespace

ProfileEvent::ProfileEvent(const std::string& name) : id_(event_id(name)) {
  if (id_ >= 0)
    PetscLogEventBegin(PetscLogEvent(id_), 0, 0, 0, 0);
}

ProfileEvent::~ProfileEvent() {
  if (id_ >= 0)
    PetscLogEventEnd(PetscLogEvent(id_), 0, 0, 0, 0);
}

void ProfileEvent::add_flops(double flops) {
  PetscBool initialised = PETSC_FALSE;
  PetscInitialized(&initialised);
  if (initialised)
    PetscLogFlops(flops);
}

} // namespace gradmap
