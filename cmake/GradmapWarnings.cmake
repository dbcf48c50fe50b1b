# Interface targets carrying the project's warning flags and, optionally, sanitizers.
add_library(gradmap_warnings INTERFACE)
add_library(gradmap::warnings ALIAS gradmap_warnings)
target_compile_options(gradmap_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wshadow=local -Wnon-virtual-dtor -Wno-unused-parameter>)
if(GRADMAP_WERROR)
  target_compile_options(gradmap_warnings INTERFACE -Werror)
endif()
if(GRADMAP_SANITIZE)
  target_compile_options(gradmap_warnings INTERFACE -fsanitize=address,undefined -fno-omit-frame-pointer)
  target_link_options(gradmap_warnings INTERFACE -fsanitize=address,undefined)
endif()
