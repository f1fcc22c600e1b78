# CUDA part of the build. Included by CMakeLists.txt before find_package(Torch), with
#   _torch_cuda_version  torch.version.cuda of the installed torch, or "none"
#   _torch_cuda_archs    the GPU code that torch was built for ("sm_80 sm_90 compute_90"), or "none"
# Sets FASTRNN_WITH_CUDA and defines fastrnn_configure_cuda_target(target).
#
# FASTRNN_CUDA=AUTO builds the CUDA kernels when torch is a CUDA build and nvcc is found, ON
# requires both, OFF never builds them. Architectures, first given wins: FASTRNN_CUDA_ARCHS,
# CMAKE_CUDA_ARCHITECTURES, the TORCH_CUDA_ARCH_LIST environment variable, the installed
# torch's own list; architectures this nvcc cannot target are left out with a warning.

set(FASTRNN_WITH_CUDA OFF)
string(TOUPPER "${FASTRNN_CUDA}" _fastrnn_cuda_mode)
if(NOT _fastrnn_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "FASTRNN_CUDA must be AUTO, ON or OFF, got '${FASTRNN_CUDA}'")
endif()

if(NOT _fastrnn_cuda_mode STREQUAL "OFF")
  if(_torch_cuda_version STREQUAL "none")
    if(_fastrnn_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR "FASTRNN_CUDA=ON, but the installed torch is not a CUDA build")
    endif()
    message(STATUS "fastrnn: CPU only (the installed torch is not a CUDA build)")
  else()
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(FASTRNN_WITH_CUDA ON)
    elseif(_fastrnn_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR "FASTRNN_CUDA=ON, but no CUDA compiler (nvcc) was found; set CUDACXX "
                          "or put nvcc on PATH")
    else()
      message(WARNING "fastrnn: torch is a CUDA ${_torch_cuda_version} build but nvcc was not "
                      "found: building the CPU kernels only")
    endif()
  endif()
endif()

if(NOT FASTRNN_WITH_CUDA)
  return()
endif()

# Remember a user's CMAKE_CUDA_ARCHITECTURES: torch's CMake config resets it.
if(DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(_fastrnn_user_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
endif()

if(NOT DEFINED CMAKE_CUDA_STANDARD)
  set(CMAKE_CUDA_STANDARD 17)
endif()
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
# Architectures are set per target below; left defined, torch's config would warn and reset it.
unset(CMAKE_CUDA_ARCHITECTURES)
unset(CMAKE_CUDA_ARCHITECTURES CACHE)
message(STATUS "fastrnn: building CUDA kernels (torch CUDA ${_torch_cuda_version}, "
               "nvcc ${CMAKE_CUDA_COMPILER_VERSION})")

# Architecture list in CMake's CUDA_ARCHITECTURES form (90-real, 90-virtual, 90), from the
# forms torch uses: sm_90 / compute_90 (torch._C._cuda_getArchFlags) and 9.0 / 9.0+PTX
# (TORCH_CUDA_ARCH_LIST). CMake forms pass through unchanged.
function(_fastrnn_normalize_archs out)
  set(result "")
  string(REPLACE " " ";" items "${ARGN}")
  foreach(item IN LISTS items)
    string(STRIP "${item}" item)
    if(item STREQUAL "")
      continue()
    elseif(item MATCHES "^sm_([0-9]+[a-z]?)$")
      list(APPEND result "${CMAKE_MATCH_1}-real")
    elseif(item MATCHES "^compute_([0-9]+[a-z]?)$")
      list(APPEND result "${CMAKE_MATCH_1}-virtual")
    elseif(item MATCHES "^([0-9]+)\\.([0-9]+[a-z]?)(\\+PTX)?$")
      if(CMAKE_MATCH_3)
        list(APPEND result "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
      else()
        list(APPEND result "${CMAKE_MATCH_1}${CMAKE_MATCH_2}-real")
      endif()
    else()
      list(APPEND result "${item}")  # 90, 90-real, 90-virtual, native, all, all-major
    endif()
  endforeach()
  list(REMOVE_DUPLICATES result)
  set(${out} "${result}" PARENT_SCOPE)
endfunction()

if(FASTRNN_CUDA_ARCHS)
  set(_fastrnn_archs_from "FASTRNN_CUDA_ARCHS")
  set(_fastrnn_archs_in "${FASTRNN_CUDA_ARCHS}")
elseif(DEFINED _fastrnn_user_cuda_archs AND NOT _fastrnn_user_cuda_archs STREQUAL "")
  set(_fastrnn_archs_from "CMAKE_CUDA_ARCHITECTURES")
  set(_fastrnn_archs_in "${_fastrnn_user_cuda_archs}")
elseif(NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(_fastrnn_archs_from "TORCH_CUDA_ARCH_LIST")
  set(_fastrnn_archs_in "$ENV{TORCH_CUDA_ARCH_LIST}")
elseif(NOT _torch_cuda_archs STREQUAL "none")
  set(_fastrnn_archs_from "the installed torch")
  set(_fastrnn_archs_in "${_torch_cuda_archs}")
else()
  set(_fastrnn_archs_from "the default")
  set(_fastrnn_archs_in "80;90")
endif()
_fastrnn_normalize_archs(_fastrnn_archs ${_fastrnn_archs_in})

# Leave out the architectures this nvcc cannot compile for (a torch built with a newer CUDA
# may list some); keep named sets such as native or all.
execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --list-gpu-code
                OUTPUT_VARIABLE _fastrnn_nvcc_codes ERROR_QUIET RESULT_VARIABLE _fastrnn_rc)
if(_fastrnn_rc EQUAL 0 AND _fastrnn_nvcc_codes MATCHES "sm_")
  set(_fastrnn_kept "")
  foreach(arch IN LISTS _fastrnn_archs)
    if(arch MATCHES "^([0-9]+)[a-z]?(-real|-virtual)?$")
      if(NOT "${_fastrnn_nvcc_codes}\n" MATCHES "sm_${CMAKE_MATCH_1}[\r\n]")
        message(WARNING "fastrnn: ${CMAKE_CUDA_COMPILER} cannot compile for ${arch}; left out")
        continue()
      endif()
    endif()
    list(APPEND _fastrnn_kept "${arch}")
  endforeach()
  set(_fastrnn_archs "${_fastrnn_kept}")
endif()
if(NOT _fastrnn_archs)
  message(FATAL_ERROR "fastrnn: no CUDA architecture left to build for (from "
                      "${_fastrnn_archs_from}: '${_fastrnn_archs_in}')")
endif()
set(FASTRNN_CUDA_ARCHITECTURES "${_fastrnn_archs}")
message(STATUS "fastrnn: CUDA architectures ${FASTRNN_CUDA_ARCHITECTURES} (from ${_fastrnn_archs_from})")

# After find_package(Torch): compile `target`'s CUDA sources for FASTRNN_CUDA_ARCHITECTURES
# only (torch's config adds -gencode flags for its own choice to CMAKE_CUDA_FLAGS), link the
# shared CUDA runtime that torch uses, and define FASTRNN_WITH_CUDA for every source.
function(fastrnn_configure_cuda_target target)
  string(REGEX REPLACE "-gencode[ =]+arch=[^ ]+" "" _flags "${CMAKE_CUDA_FLAGS}")
  string(REGEX REPLACE " +" " " _flags "${_flags}")
  set(CMAKE_CUDA_FLAGS "${_flags}" PARENT_SCOPE)
  set_target_properties(${target} PROPERTIES
    CUDA_ARCHITECTURES "${FASTRNN_CUDA_ARCHITECTURES}"
    CUDA_RUNTIME_LIBRARY Shared)
  target_compile_definitions(${target} PRIVATE FASTRNN_WITH_CUDA
    # As torch's own CUDA extensions: c10::Half/BFloat16 bring their own conversions.
    "$<$<COMPILE_LANGUAGE:CUDA>:__CUDA_NO_HALF_OPERATORS__;__CUDA_NO_HALF_CONVERSIONS__;__CUDA_NO_BFLOAT16_CONVERSIONS__;__CUDA_NO_HALF2_OPERATORS__>")
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>")
endfunction()
