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

# The cuBLAS, cuSPARSE and cuSOLVER headers, for sources that include ATen's CUDA context
# (ATen/cuda/CUDAContext.h and the headers that include it). fastrnn's own sources need none
# of them: csrc/ops/cuda_loop.cu runs its GEMMs through ATen ops. A toolkit that lacks them
# (nvcc with the runtime headers only, as on the development machines) takes them from the
# pip packages that torch's CUDA wheel depends on: site-packages/nvidia/cu13/include (CUDA 13)
# or nvidia/<library>/include (CUDA 12). They come after every other include directory, so
# the toolkit's own headers (cuda_runtime.h, ...) always win over the copies there.
function(_fastrnn_cuda_library_headers target)
  set(_wanted cublas_v2.h cublasLt.h cusparse.h cusolverDn.h)
  set(_missing "")
  foreach(header IN LISTS _wanted)
    find_file(_fastrnn_found_${header} ${header} PATHS ${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES}
              NO_DEFAULT_PATH NO_CACHE)
    if(NOT _fastrnn_found_${header})
      list(APPEND _missing ${header})
    endif()
  endforeach()
  if(NOT _missing)
    return()
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "
import glob, importlib.util, os
spec = importlib.util.find_spec('nvidia')
roots = list(spec.submodule_search_locations) if spec else []
dirs = sorted({os.path.dirname(h) for r in roots for n in '${_missing}'.split(';')
               for h in glob.glob(os.path.join(r, '*', 'include', n))})
print(';'.join(dirs))"
    OUTPUT_VARIABLE _dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  set(_still_missing "")
  foreach(header IN LISTS _missing)
    find_file(_fastrnn_pip_${header} ${header} PATHS ${_dirs} NO_DEFAULT_PATH NO_CACHE)
    if(NOT _fastrnn_pip_${header})
      list(APPEND _still_missing ${header})
    endif()
  endforeach()
  if(_dirs)
    target_include_directories(${target} SYSTEM AFTER PRIVATE
                               "$<$<COMPILE_LANGUAGE:CUDA>:${_dirs}>")
    list(JOIN _dirs ", " _names)
    message(STATUS "fastrnn: CUDA library headers from torch's pip packages: ${_names}")
  endif()
  if(_still_missing)
    list(JOIN _still_missing ", " _names)
    message(STATUS "fastrnn: ${_names} found neither in the CUDA toolkit nor under "
                   "site-packages/nvidia (not needed by fastrnn's own sources)")
  endif()
endfunction()

# torch's CMake config links its CUDA targets to CUDA::nvrtc, CUDA::cuda_driver and, by
# version, CUDA::cublas, CUDA::curand, CUDA::cufft...; FindCUDAToolkit creates those only for
# the libraries the toolkit has. With a toolkit that lacks them (nvcc and the runtime alone),
# CMake stops at generation: "links to target CUDA::nvrtc but the target was not found".
# fastrnn calls none of these libraries itself, and libtorch_cuda.so loads its own (from
# torch's pip packages), so an empty stand-in is all the link needs. Walks the link interface
# of every target in TORCH_LIBRARIES, through $<TARGET_PROPERTY:...> references.
function(_fastrnn_stand_in_missing_cuda_targets)
  set(_queue "")
  foreach(lib IN LISTS TORCH_LIBRARIES)
    if(TARGET "${lib}")
      list(APPEND _queue "${lib}")
    endif()
  endforeach()
  set(_seen "")
  set(_missing "")
  while(_queue)
    list(POP_FRONT _queue t)
    if(t IN_LIST _seen)
      continue()
    endif()
    list(APPEND _seen "${t}")
    if(NOT TARGET "${t}")
      if(t MATCHES "^CUDA::")
        list(APPEND _missing "${t}")
      endif()
      continue()
    endif()
    get_target_property(_libs "${t}" INTERFACE_LINK_LIBRARIES)
    if(NOT _libs)
      continue()
    endif()
    foreach(item IN LISTS _libs)
      string(REGEX MATCHALL "\\$<TARGET_PROPERTY:[^,>]+,INTERFACE_LINK_LIBRARIES>" _refs "${item}")
      foreach(ref IN LISTS _refs)
        string(REGEX REPLACE "^\\$<TARGET_PROPERTY:([^,>]+),.*$" "\\1" ref "${ref}")
        list(APPEND _queue "${ref}")
      endforeach()
      string(REGEX REPLACE "^\\$<LINK_ONLY:(.*)>$" "\\1" item "${item}")
      if(item MATCHES "^[A-Za-z0-9_.+-]+(::[A-Za-z0-9_.+-]+)?$" AND NOT item MATCHES "^-")
        list(APPEND _queue "${item}")
      endif()
    endforeach()
  endwhile()
  foreach(t IN LISTS _missing)
    add_library(${t} INTERFACE IMPORTED)
  endforeach()
  if(_missing)
    list(JOIN _missing ", " _names)
    message(STATUS "fastrnn: the CUDA toolkit lacks ${_names}, which torch's CMake config "
                   "links; using empty stand-ins (torch's own libraries load theirs)")
  endif()
endfunction()

# After find_package(Torch): compile `target`'s CUDA sources for FASTRNN_CUDA_ARCHITECTURES
# only (torch's config adds -gencode flags for its own choice to CMAKE_CUDA_FLAGS), link the
# shared CUDA runtime that torch uses, define FASTRNN_WITH_CUDA for every source, find the
# CUDA library headers and stand in for missing CUDA library targets (above).
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
  _fastrnn_cuda_library_headers(${target})
  _fastrnn_stand_in_missing_cuda_targets()
endfunction()
