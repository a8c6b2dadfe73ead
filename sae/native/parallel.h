// ParallelFor over XLA's CPU thread pool, shared by the native kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace saewb {

// Runs fn(block) for every block in [0, blocks). Blocks are handed out from an atomic counter to
// the calling thread and to one task per other pool thread. A task that starts late finds no block
// left; the caller waits only for blocks that a running thread has claimed, so a busy pool cannot
// deadlock it. fn may hold references to the caller's locals: it is only called before this returns.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t blocks, Fn fn) {
  if (blocks <= 0) return;
  struct State {
    Fn fn;
    int64_t blocks;
    std::atomic<int64_t> next{0}, done{0};
    State(Fn f, int64_t b) : fn(std::move(f)), blocks(b) {}
    void Drain() {
      for (int64_t b; (b = next.fetch_add(1)) < blocks;) {
        fn(b);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(fn), blocks);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Drain(); });
  state->Drain();
  while (state->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

}  // namespace saewb
