// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// Central finite differences in double: the reference every backward test compares with.

#include <cmath>
#include <cstddef>
#include <vector>

namespace epx::test {

//! df/dx_i ~ (f(x + step e_i) - f(x - step e_i)) / (2 step) for every finite x_i (0 for the
//! others). Truncation error ~ step^2 f''', cancellation ~ 1e-16 |f| / step.
template <class F>
std::vector<double> central_differences(std::vector<double> x, double step, F&& f) {
  std::vector<double> g(x.size(), 0.0);
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) continue;
    double const x0 = x[i];
    x[i] = x0 + step;
    double const up = f(x);
    x[i] = x0 - step;
    double const down = f(x);
    x[i] = x0;
    g[i] = (up - down) / (2.0 * step);
  }
  return g;
}

}  // namespace epx::test
