// Device selection, the process-wide stream, and the caching allocator.
#include "common.h"

#include <map>
#include <mutex>
#include <unordered_map>

namespace dq {

void fail(const std::string& what, const char* file, int line) {
  const char* base = file;
  for (const char* c = file; *c; c++) if (*c == '/') base = c + 1;
  throw Error(what + " at " + base + ":" + std::to_string(line));
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

void* poolAlloc(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu);
  size_t need = roundSize(bytes);
  auto it = freeBlocks.lower_bound(need);
  void* p = nullptr;
  size_t got = need;
  if (it != freeBlocks.end() && it->first <= need * 2) {
    p = it->second;
    got = it->first;
    cached -= got;
    freeBlocks.erase(it);
  } else {
    cudaError_t e = cudaMalloc(&p, need);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      // Out of memory with blocks cached: wait for queued work, give the cache back, try once more.
      cudaStreamSynchronize(g_stream);
      trimLocked();
      e = cudaMalloc(&p, need);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        size_t freeB = 0, totalB = 0;
        cudaMemGetInfo(&freeB, &totalB);
        fail("cudaMalloc of " + std::to_string(need) + " bytes failed: " + cudaGetErrorString(e) +
                 " (live " + std::to_string(inUse) + " B in " + std::to_string(liveBlocks.size()) +
                 " blocks; device free " + std::to_string(freeB) + " of " + std::to_string(totalB) + " B)",
             __FILE__, __LINE__);
      }
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

void poolTrim() {
  if (g_stream) CUDA_CHECK(cudaStreamSynchronize(g_stream));
  std::lock_guard<std::mutex> lock(mu);
  trimLocked();
}

}  // namespace dq
