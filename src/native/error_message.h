// How sdtune's C++ shims hand a C++ exception to Rust: as a malloc'ed
// message (Rust frees it with libc::free), so nothing unwinds across the C
// ABI. Shared by checkpoint.cpp and distributed.cpp.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace sdtune {

// A malloc'ed copy of `what`; NULL when even that cannot be allocated.
inline char* copy_message(const std::string& what) {
  char* out = static_cast<char*>(std::malloc(what.size() + 1));
  if (out) std::memcpy(out, what.c_str(), what.size() + 1);
  return out;
}

// Runs `body`; returns NULL, or the message of what it threw (torch's
// without its C++ backtrace; `where` names the place of an exception that
// carries no message).
template <typename F>
char* guarded(const char* where, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message(std::string("an unknown C++ exception in ") + where);
  }
}

}  // namespace sdtune
