// A small persistent thread pool: parallel_for(jobs, threads, fn(job, tid)). The calling thread works too
// (tid 0); workers are created on first need and then sleep on a condition variable between calls.
// Jobs are handed out dynamically, so WHICH thread runs a job varies, but every job's arithmetic is fixed:
// kernels built on this pool are deterministic as long as no output element is shared between jobs.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dq {

constexpr int kMaxThreads = 64;

class Pool {
 public:
  void run(int jobs, int threads, const std::function<void(int, int)>& fn) {
    if (jobs <= 0) return;
    std::lock_guard<std::mutex> serial(callMu_);  // one parallel region at a time (e.g. worker_threads callers)
    int use = std::min(std::min(threads, jobs), kMaxThreads) - 1;
    if (use <= 0) {
      for (int j = 0; j < jobs; j++) fn(j, 0);
      return;
    }
    ensure(use);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      nJobs_ = jobs;
      next_.store(0);
      nUse_ = use;
      pending_ = use;
      gen_++;
    }
    cv_.notify_all();
    work(&fn, 0);
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void ensure(int n) {
    while ((int)threads_ < n) {
      int id = threads_++;
      // Detached and never joined: the pool lives until the process exits (no static-destruction order issues).
      std::thread([this, id] { loop(id); }).detach();
    }
  }
  void loop(int id) {
    unsigned long long seen = 0;
    for (;;) {
      const std::function<void(int, int)>* f;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (id >= nUse_) continue;
        f = fn_;
      }
      work(f, id + 1);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }
  void work(const std::function<void(int, int)>* f, int tid) {
    for (;;) {
      int j = next_.fetch_add(1);
      if (j >= nJobs_) break;
      (*f)(j, tid);
    }
  }

  std::mutex callMu_, mu_;
  std::condition_variable cv_, done_;
  const std::function<void(int, int)>* fn_ = nullptr;
  std::atomic<int> next_{0};
  int nJobs_ = 0, nUse_ = 0, pending_ = 0, threads_ = 0;
  unsigned long long gen_ = 0;
};

inline Pool& pool() {
  static Pool* p = new Pool();  // leaked on purpose, see ensure()
  return *p;
}

}  // namespace dq
