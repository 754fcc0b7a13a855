// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// An injected environment for the bootstrap tests, so no test calls setenv.

#include <epx/nccl/launch_env.hpp>

#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace epx::test {

using EnvMap = std::map<std::string, std::string, std::less<>>;

//! A lookup over `vars`; like getenv, an empty value counts as unset.
inline detail::EnvLookup env_of(EnvMap vars) {
  return [vars = std::move(vars)](std::string_view name) -> std::optional<std::string> {
    auto const it = vars.find(name);
    if (it == vars.end() || it->second.empty()) return std::nullopt;
    return it->second;
  };
}

}  // namespace epx::test
