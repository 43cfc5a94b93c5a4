// Shared by every translation unit of the dqlora CUDA addon: error checking that throws (never aborts),
// the one stream all work is queued on, the caching device allocator, and dtype codes.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace dq {

// dtype codes shared with native.ts (DTYPE_CODE there). Keep in sync.
enum DType : int { F32 = 0, BF16 = 1, F16 = 2, I32 = 3, U8 = 4 };

/** A failed CUDA / cuBLAS call or a bad argument; the binding layer turns it into a JS Error. */
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/**
 * The device has no memory for an allocation (cudaMalloc failed after the pool gave its cache back, the pool's
 * limit, or any CUDA call returning cudaErrorMemoryAllocation). The binding layer turns it into a JS Error with
 * code 'DQLORA_OOM' and requestedBytes, which a trainer recognises and survives by splitting the micro-batch.
 */
struct OutOfMemory : Error {
  size_t requested;
  OutOfMemory(const std::string& what, size_t requested) : Error(what), requested(requested) {}
};

[[noreturn]] void fail(const std::string& what, const char* file, int line);
/** fail() for a CUDA error code: OutOfMemory for cudaErrorMemoryAllocation, Error otherwise. */
[[noreturn]] void failCuda(cudaError_t err, const char* expr, const char* file, int line);

// Every CUDA runtime call goes through CUDA_CHECK: it throws dq::Error("<call> failed: <reason> at file:line").
#define CUDA_CHECK(expr)                                                                           \
  do {                                                                                             \
    cudaError_t err_ = (expr);                                                                     \
    if (err_ != cudaSuccess) ::dq::failCuda(err_, #expr, __FILE__, __LINE__);                      \
  } while (0)

// After every kernel launch: a launch error (bad config, no kernel image for this GPU) is caught here.
#define KERNEL_CHECK() CUDA_CHECK(cudaGetLastError())

#define REQUIRE(cond, msg)                                                                         \
  do {                                                                                             \
    if (!(cond)) ::dq::fail(std::string("bad argument: ") + (msg), __FILE__, __LINE__);            \
  } while (0)

/** The stream every kernel, copy and GEMM of this process is queued on (created by init()). */
cudaStream_t stream();

// ---- caching allocator ---------------------------------------------------------------------------
// Freed blocks go to a cache keyed by size and are handed out again (stream-ordered: all work is on one
// stream, so a block freed after enqueueing its last use can be reused by the next enqueued op).
void* poolAlloc(size_t bytes);
void poolFree(void* p);
struct PoolStats {
  size_t inUse;     // bytes of live blocks (rounded sizes)
  size_t cached;    // bytes of free blocks kept for reuse
  size_t peakInUse; // high-water mark of inUse
  size_t reserved;  // inUse + cached: what cudaMalloc holds
  size_t peakReserved;
  size_t liveBlocks;
};
PoolStats poolStats();
void poolResetPeak();
/** Returns every cached free block to the driver (cudaFree). */
void poolTrim();
/** Caps live + cached bytes (0 = no cap): beyond it the cache is given back, then the allocation fails (OutOfMemory). */
void poolSetLimit(size_t bytes);

/** RAII scratch from the pool, freed at scope exit (the free is stream-ordered, see above). */
struct Scratch {
  void* p = nullptr;
  explicit Scratch(size_t bytes) : p(bytes ? poolAlloc(bytes) : nullptr) {}
  ~Scratch() { if (p) poolFree(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T> T* as() const { return static_cast<T*>(p); }
};

inline unsigned blocksFor(size_t n, unsigned threads, unsigned cap = 65535u * 8u) {
  size_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return b > cap ? cap : (unsigned)b;
}

// ---- loads/stores of either float dtype -------------------------------------------------------------
__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

}  // namespace dq

// Dispatches a float dtype code to a C++ type named T inside the body; f16 and integer dtypes are refused.
#define DISPATCH_FLOAT(dt, T, ...)                                                                 \
  do {                                                                                             \
    if ((dt) == ::dq::F32) { using T = float; __VA_ARGS__; }                                       \
    else if ((dt) == ::dq::BF16) { using T = __nv_bfloat16; __VA_ARGS__; }                         \
    else ::dq::fail("dtype code " + std::to_string(dt) + " is not f32/bf16", __FILE__, __LINE__);  \
  } while (0)
