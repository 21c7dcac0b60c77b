// Shared helpers for the xla_ops FFI handlers (CPU and CUDA).
//
// Conventions (every handler follows them):
//  * Point arrays are float32 [..., N, C]; all leading dims are flattened into one batch dim B, which is what
//    makes vmap (vmap_method="broadcast_all") and arbitrary batch shapes work.
//  * Index outputs are int32. Distances are squared unless a name says otherwise.
//  * Every shape the Python wrapper already checked is checked again by the op's Check<Op> in checks.h, the
//    same function on CPU and CUDA; a mismatch returns ffi::Error::InvalidArgument (never a crash, never an
//    out-of-bounds read).
//  * Handlers register themselves with XLA_OPS_REGISTER; bindings_*.cc export the registry to Python.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace xla_ops {

namespace ffi = xla::ffi;

// A point set [B, N, C] viewed through its flattened leading dims.
struct PointShape {
  int64_t b = 1;  // product of all leading dims
  int64_t n = 0;  // number of points (dims[-2])
  int64_t c = 0;  // channels (dims[-1])
};

// Flattens `dims` (rank >= min_rank) into [B, dims[-2], dims[-1]]. `what` names the argument in errors.
inline ffi::ErrorOr<PointShape> AsPointShape(ffi::Span<const int64_t> dims, const char* what,
                                             int64_t min_rank = 2) {
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (rank < min_rank || rank < 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        std::string(what) + ": expected rank >= " + std::to_string(std::max<int64_t>(min_rank, 2)) +
        " ([..., N, C]), got rank " + std::to_string(rank)));
  }
  PointShape s;
  for (int64_t i = 0; i + 2 < rank; ++i) s.b *= dims[i];
  s.n = dims[rank - 2];
  s.c = dims[rank - 1];
  return s;
}

// The one error helper of the handlers: INVALID_ARGUMENT "<op>: <msg>" (the checks in checks.h use it).
inline ffi::Error InvalidArgument(const std::string& op, const std::string& msg) {
  return ffi::Error::InvalidArgument(op + ": " + msg);
}

// Runs fn(begin, end) over [0, n) split into contiguous chunks on XLA's intra-op thread pool and returns a
// future that completes when every chunk is done. Work items must be independent, so results never depend
// on the thread count. `fn` is copied into every task: capture raw pointers and sizes by value only.
template <typename Fn>
ffi::Future ParallelFor(const ffi::ThreadPool& pool, int64_t n, int64_t min_items_per_task, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t max_tasks = std::max<int64_t>(1, threads * 4);
  const int64_t per_task = std::max<int64_t>(std::max<int64_t>(min_items_per_task, 1),
                                             (n + max_tasks - 1) / max_tasks);
  const int64_t tasks = std::max<int64_t>(1, (n + per_task - 1) / per_task);
  ffi::Promise promise;
  ffi::Future future(promise);
  if (n <= 0) {
    promise.SetAvailable();
    return future;
  }
  if (tasks == 1) {
    fn(int64_t{0}, n);
    promise.SetAvailable();
    return future;
  }
  ffi::CountDownPromise counter(std::move(promise), tasks);
  ffi::ThreadPool pool_copy = pool;
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t begin = t * per_task;
    const int64_t end = std::min(n, begin + per_task);
    pool_copy.Schedule([fn, begin, end, counter]() mutable {
      fn(begin, end);
      counter.CountDown();
    });
  }
  return future;
}

// Runs fn(item) for every item in [0, count) on the pool and on the calling thread, and returns when all
// are done (a barrier). Items are taken dynamically: fn(item) must not depend on which thread runs it.
// Unlike ParallelFor it blocks, which lets a handler run several dependent passes while its ThreadPool
// context is valid (cpu/emd.cc). It cannot deadlock: the caller works through the items itself and only
// waits for items that a running thread has already taken.
inline void RunParallel(const ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> fn) {
  if (count <= 0) return;
  struct State {
    std::function<void(int64_t)> fn;
    int64_t count;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->fn = std::move(fn);
  state->count = count;
  auto work = [](State& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.count; i = s.next.fetch_add(1)) {
      s.fn(i);
      if (s.done.fetch_add(1) + 1 == s.count) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  ffi::ThreadPool pool_copy = pool;
  // A helper that starts late finds no item left and returns without touching fn's captures.
  for (int64_t h = 0; h < helpers; ++h) pool_copy.Schedule([state, work]() { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->count; });
}

// ---- handler registry ---------------------------------------------------------------------------
struct Registration {
  std::string name;  // FFI target name, identical on every platform
  void* handler;     // XLA_FFI_Handler*
};

inline std::vector<Registration>& Registry() {
  static std::vector<Registration> registry;
  return registry;
}

struct Registrar {
  Registrar(const char* name, void* handler) { Registry().push_back({name, handler}); }
};

}  // namespace xla_ops

#define XLA_OPS_CONCAT_INNER(a, b) a##b
#define XLA_OPS_CONCAT(a, b) XLA_OPS_CONCAT_INNER(a, b)
// Registers a handler symbol defined with XLA_FFI_DEFINE_HANDLER_SYMBOL under an FFI target name.
#define XLA_OPS_REGISTER(target_name, symbol)                               \
  static ::xla_ops::Registrar XLA_OPS_CONCAT(xla_ops_registrar_, __LINE__)( \
      target_name, reinterpret_cast<void*>(symbol))
