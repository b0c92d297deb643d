# Locate the ONNX Runtime C/C++ headers (onnxruntime_cxx_api.h) without linking against ORT.
#
# 1. ORT_INCLUDE_DIR (CMake variable or environment variable) when set;
# 2. otherwise Debian trixie's libonnxruntime-dev is downloaded into the build directory with
#    apt-get -o ... (own source list, lists and cache: the system is not touched) and unpacked with dpkg -x.
# Result: ORT_HEADERS_DIR (the folder that holds onnxruntime_cxx_api.h).

set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}" CACHE PATH "Folder holding onnxruntime_cxx_api.h (empty: fetch Debian's libonnxruntime-dev)")

function(_onnxqat_find_header_dir root out)
  file(GLOB_RECURSE _hits "${root}/*onnxruntime_cxx_api.h")
  if(_hits)
    list(GET _hits 0 _first)
    get_filename_component(_dir "${_first}" DIRECTORY)
    set(${out} "${_dir}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

if(ORT_INCLUDE_DIR)
  if(EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_cxx_api.h")
    set(ORT_HEADERS_DIR "${ORT_INCLUDE_DIR}")
  else()
    _onnxqat_find_header_dir("${ORT_INCLUDE_DIR}" ORT_HEADERS_DIR)
  endif()
  if(NOT ORT_HEADERS_DIR)
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} holds no onnxruntime_cxx_api.h")
  endif()
else()
  set(_ortdeb "${CMAKE_BINARY_DIR}/_ortdeb")
  set(_extract "${_ortdeb}/x")
  _onnxqat_find_header_dir("${_extract}" ORT_HEADERS_DIR)
  if(NOT ORT_HEADERS_DIR)
    find_program(APT_GET apt-get)
    find_program(DPKG dpkg)
    if(NOT APT_GET OR NOT DPKG)
      message(FATAL_ERROR "ONNX Runtime headers: set ORT_INCLUDE_DIR (no apt-get/dpkg to fetch Debian's libonnxruntime-dev)")
    endif()
    set(ONNXQAT_DEBIAN_SUITE "trixie" CACHE STRING "Debian suite whose libonnxruntime-dev provides the headers")
    file(MAKE_DIRECTORY "${_ortdeb}/lists/partial" "${_ortdeb}/cache/archives/partial" "${_extract}")
    file(WRITE "${_ortdeb}/sources.list" "deb http://deb.debian.org/debian ${ONNXQAT_DEBIAN_SUITE} main\n")
    set(_apt_opts
      -o "Dir::Etc::sourcelist=${_ortdeb}/sources.list"
      -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=${_ortdeb}/lists"
      -o "Dir::Cache=${_ortdeb}/cache"
      -o "Dir::State::status=/dev/null"
      -o "Debug::NoLocking=1"
      -o "APT::Sandbox::User=root")
    message(STATUS "Fetching libonnxruntime-dev headers (Debian ${ONNXQAT_DEBIAN_SUITE}) into ${_ortdeb}")
    execute_process(COMMAND ${APT_GET} ${_apt_opts} -qq update
      RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "apt-get update (private lists) failed: ${_err}\nSet ORT_INCLUDE_DIR instead.")
    endif()
    execute_process(COMMAND ${APT_GET} ${_apt_opts} -qq download libonnxruntime-dev
      WORKING_DIRECTORY "${_ortdeb}" RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
    file(GLOB _debs "${_ortdeb}/libonnxruntime-dev_*.deb")
    if(NOT _rc EQUAL 0 OR NOT _debs)
      message(FATAL_ERROR "apt-get download libonnxruntime-dev failed: ${_err}\nSet ORT_INCLUDE_DIR instead.")
    endif()
    list(GET _debs 0 _deb)
    execute_process(COMMAND ${DPKG} -x "${_deb}" "${_extract}" RESULT_VARIABLE _rc ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "dpkg -x ${_deb} failed: ${_err}")
    endif()
    _onnxqat_find_header_dir("${_extract}" ORT_HEADERS_DIR)
    if(NOT ORT_HEADERS_DIR)
      message(FATAL_ERROR "${_deb} holds no onnxruntime_cxx_api.h")
    endif()
  endif()
endif()
message(STATUS "ONNX Runtime headers: ${ORT_HEADERS_DIR}")
