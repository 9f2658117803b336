// Compile-time switches on runtime flags, after flash-attention's static_switch.h: the body is
// instantiated once per value, so a kernel templated on the flag branches at compile time.
//
//   BOOL_SWITCH(accumulate, kAccumulate, [&] { kernel<kAccumulate><<<...>>>(...); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
