// Host emulation of the CUDA features the rotatekv kernels use, so that the kernel sources
// compile as C++20 and run on machines without a GPU (the Rust tests compare them with the
// CPU store; CI catches indexing and logic errors before any GPU sees them).
//
// A launch runs the grid's blocks one after another on the calling thread. A block's CUDA
// threads are fibers (ucontext) scheduled cooperatively: `__syncthreads` waits until every
// live thread of the block has arrived, a warp shuffle until the 32 lanes of its warp have;
// a barrier nobody can complete aborts with a message instead of hanging. `__shared__`
// variables are function statics (blocks never overlap) and dynamic shared memory is one
// buffer per launch. Launches are serialized (the state below is global).
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <functional>
#include <ucontext.h>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace emu {

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 thread_idx;
inline dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;

enum class State { Ready, WaitBlock, WaitWarp, Done };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = State::Ready;
};

struct Sched {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> lanes;  // shuffle exchange, one slot per thread
  unsigned current = 0;
  std::function<void()> body;
};

inline Sched* sched = nullptr;
inline std::vector<unsigned char> dyn;
inline std::mutex launch_lock;

inline void* dyn_smem() { return dyn.data(); }

inline void fiber_entry() {
  sched->body();
  sched->fibers[sched->current].state = State::Done;
  swapcontext(&sched->fibers[sched->current].ctx, &sched->main);
}

// Parks the running fiber in `st` until the scheduler releases it.
inline void wait(State st) {
  Fiber& f = sched->fibers[sched->current];
  f.state = st;
  swapcontext(&f.ctx, &sched->main);
}

inline void run_block(unsigned threads) {
  Sched& s = *sched;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
  }
  for (;;) {
    bool ran = false;
    for (unsigned t = 0; t < threads; ++t) {
      if (s.fibers[t].state != State::Ready) continue;
      s.current = t;
      thread_idx = dim3(t);
      swapcontext(&s.main, &s.fibers[t].ctx);
      ran = true;
    }
    // Release complete barriers: every live thread at __syncthreads, or a whole warp at a
    // shuffle.
    unsigned live = 0, at_block = 0;
    bool released = false;
    for (auto& f : s.fibers) live += f.state != State::Done, at_block += f.state == State::WaitBlock;
    if (live == 0) return;
    if (at_block == live) {
      for (auto& f : s.fibers) if (f.state == State::WaitBlock) f.state = State::Ready;
      released = true;
    }
    for (unsigned w = 0; w < threads / 32; ++w) {
      bool all = true;
      for (unsigned l = 0; l < 32; ++l) all = all && s.fibers[w * 32 + l].state == State::WaitWarp;
      if (all) {
        for (unsigned l = 0; l < 32; ++l) s.fibers[w * 32 + l].state = State::Ready;
        released = true;
      }
    }
    if (!ran && !released) {
      std::fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u)\n", block_idx.x, block_idx.y,
                   block_idx.z);
      std::abort();
    }
  }
}

// Runs `body` for every block of `grid` with `threads` threads each (a multiple of 32).
template <class F>
void launch(dim3 grid, unsigned threads, size_t smem, F body) {
  if (threads == 0 || threads % 32 != 0) throw std::invalid_argument("threads % 32 != 0");
  std::lock_guard<std::mutex> lock(launch_lock);
  block_dim = dim3(threads);
  grid_dim = grid;
  dyn.assign(smem + 16, 0);
  Sched s;
  s.fibers.resize(threads);
  for (auto& f : s.fibers) f.stack.resize(256 * 1024);
  s.lanes.resize(threads);
  s.body = body;
  sched = &s;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        run_block(threads);
      }
  sched = nullptr;
}

template <class T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  unsigned t = thread_idx.x, lane = t % 32, warp = t / 32;
  std::memcpy(&sched->lanes[t], &v, sizeof(T));
  wait(State::WaitWarp);
  T r;
  std::memcpy(&r, &sched->lanes[warp * 32 + (lane ^ (unsigned)lane_mask)], sizeof(T));
  wait(State::WaitWarp);
  return r;
}

}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::wait(emu::State::WaitBlock); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return emu::shfl_xor(v, lane_mask);
}

inline unsigned atomicAnd(unsigned* p, unsigned v) {
  return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
