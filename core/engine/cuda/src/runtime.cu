// Device selection, the process-wide stream, and the caching allocator.
#include "common.h"

#include <map>
#include <mutex>
#include <unordered_map>

namespace dq {

static const char* baseName(const char* file) {
  const char* base = file;
  for (const char* c = file; *c; c++) if (*c == '/') base = c + 1;
  return base;
}

void fail(const std::string& what, const char* file, int line) {
  throw Error(what + " at " + baseName(file) + ":" + std::to_string(line));
}

void failCuda(cudaError_t err, const char* expr, const char* file, int line) {
  std::string what = std::string(expr) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") at " +
                     baseName(file) + ":" + std::to_string(line);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // not sticky: clear it so the next call does not report it again
    throw OutOfMemory(what, 0);
  }
  throw Error(what);
}

static cudaStream_t g_stream = nullptr;
cudaStream_t stream() {
  if (!g_stream) fail("the CUDA backend is not initialised (call init first)", __FILE__, __LINE__);
  return g_stream;
}

void initStream() {
  if (!g_stream) CUDA_CHECK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
}

// ---- caching allocator ----------------------------------------------------------------------------
// Sizes are rounded up (512 B below 1 MiB, 2 MiB above) so that blocks of similar tensors are
// interchangeable. A cached block serves a request whose rounded size is at least half the block's size,
// so a small tensor never pins a huge block.
namespace {
std::mutex mu;
std::multimap<size_t, void*> freeBlocks;      // rounded size -> block
std::unordered_map<void*, size_t> liveBlocks;  // block -> rounded size
size_t inUse = 0, cached = 0, peakInUse = 0, peakReserved = 0;
size_t limit = 0;  // poolSetLimit: cap on inUse + cached (0 = none)

size_t roundSize(size_t n) {
  if (n == 0) n = 1;
  const size_t small = 512, large = size_t(2) << 20;
  return n < (size_t(1) << 20) ? (n + small - 1) / small * small : (n + large - 1) / large * large;
}

void trimLocked() {
  for (auto& kv : freeBlocks) cudaFree(kv.second);  // errors ignored: trimming is best effort
  freeBlocks.clear();
  cached = 0;
}
}  // namespace

[[noreturn]] static void failOutOfMemory(const std::string& why, size_t need, const char* file, int line) {
  size_t freeB = 0, totalB = 0;
  cudaMemGetInfo(&freeB, &totalB);
  (void)cudaGetLastError();
  throw OutOfMemory("cudaMalloc of " + std::to_string(need) + " bytes failed: " + why + " (live " + std::to_string(inUse) +
                        " B in " + std::to_string(liveBlocks.size()) + " blocks; device free " + std::to_string(freeB) +
                        " of " + std::to_string(totalB) + " B) at " + baseName(file) + ":" + std::to_string(line),
                    need);
}

void* poolAlloc(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu);
  size_t need = roundSize(bytes);
  // The limit rehearses a smaller device: live bytes may not pass it, whatever the cache holds.
  if (limit && inUse + need > limit)
    failOutOfMemory("out of memory under the pool limit of " + std::to_string(limit) + " B", need, __FILE__, __LINE__);
  auto it = freeBlocks.lower_bound(need);
  void* p = nullptr;
  size_t got = need;
  if (it != freeBlocks.end() && it->first <= need * 2 && (!limit || inUse + it->first <= limit)) {
    p = it->second;
    got = it->first;
    cached -= got;
    freeBlocks.erase(it);
  } else {
    if (limit && inUse + cached + need > limit) {
      // Under the limit only once the cache is given back (as a full device would make us).
      cudaStreamSynchronize(g_stream);
      trimLocked();
    }
    cudaError_t e = cudaMalloc(&p, need);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      // Out of memory with blocks cached: wait for queued work, give the cache back, try once more.
      cudaStreamSynchronize(g_stream);
      trimLocked();
      e = cudaMalloc(&p, need);
      if (e != cudaSuccess) failOutOfMemory(cudaGetErrorString(e), need, __FILE__, __LINE__);
    }
  }
  liveBlocks[p] = got;
  inUse += got;
  if (inUse > peakInUse) peakInUse = inUse;
  if (inUse + cached > peakReserved) peakReserved = inUse + cached;
  return p;
}

void poolFree(void* p) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = liveBlocks.find(p);
  if (it == liveBlocks.end()) fail("free of a device pointer that is not live (freed twice?)", __FILE__, __LINE__);
  size_t sz = it->second;
  liveBlocks.erase(it);
  inUse -= sz;
  cached += sz;
  freeBlocks.emplace(sz, p);
}

PoolStats poolStats() {
  std::lock_guard<std::mutex> lock(mu);
  return PoolStats{inUse, cached, peakInUse, inUse + cached, peakReserved, liveBlocks.size()};
}

void poolResetPeak() {
  std::lock_guard<std::mutex> lock(mu);
  peakInUse = inUse;
  peakReserved = inUse + cached;
}

void poolSetLimit(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu);
  limit = bytes;
}

void poolTrim() {
  if (g_stream) CUDA_CHECK(cudaStreamSynchronize(g_stream));
  std::lock_guard<std::mutex> lock(mu);
  trimLocked();
}

}  // namespace dq
