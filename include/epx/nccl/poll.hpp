// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! A deadline for host-side polling loops (NCCL async state, a stream, a file), with a backoff
//! that reacts fast to short waits and stops burning a core on long ones.

#include <algorithm>
#include <chrono>
#include <thread>

namespace epx::detail {

class PollDeadline {
 public:
  using Clock = std::chrono::steady_clock;

  //! Expires `timeout` from now. `pause()` yields while less than `spin` has elapsed, then sleeps
  //! `min_sleep`, doubling per pause up to `max_sleep`.
  PollDeadline(std::chrono::milliseconds timeout, std::chrono::microseconds spin, std::chrono::microseconds min_sleep,
               std::chrono::microseconds max_sleep) noexcept
      : start_(Clock::now()), deadline_(start_ + timeout), spin_(spin), sleep_(min_sleep), max_sleep_(max_sleep) {}

  //! For waits on the GPU (NCCL state, a stream): tens of microseconds of reaction time.
  [[nodiscard]] static PollDeadline for_device(std::chrono::milliseconds timeout) noexcept {
    using std::chrono::microseconds;
    return PollDeadline(timeout, microseconds(100), microseconds(10), microseconds(200));
  }
  //! For waits on the file system (another process writing a file): milliseconds are plenty.
  [[nodiscard]] static PollDeadline for_files(std::chrono::milliseconds timeout) noexcept {
    using std::chrono::microseconds;
    return PollDeadline(timeout, microseconds(0), microseconds(1000), microseconds(100'000));
  }

  [[nodiscard]] bool expired() const noexcept { return Clock::now() >= deadline_; }
  [[nodiscard]] std::chrono::milliseconds elapsed() const noexcept {
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start_);
  }

  //! Waits a little before the next poll; never sleeps past the deadline.
  void pause() noexcept {
    auto const now = Clock::now();
    if (now - start_ < spin_) {
      std::this_thread::yield();
      return;
    }
    auto const left = std::chrono::duration_cast<std::chrono::microseconds>(deadline_ - now);
    std::this_thread::sleep_for(std::clamp(left, std::chrono::microseconds(0), sleep_));
    sleep_ = std::min(sleep_ * 2, max_sleep_);
  }

 private:
  Clock::time_point start_, deadline_;
  std::chrono::microseconds spin_, sleep_, max_sleep_;
};

}  // namespace epx::detail
