// Asynchronous device → host copies: the JS thread queues the copy and goes on queueing kernels; a Promise
// resolves when the bytes are in the caller's typed array.
//
//   compute stream: ... kernels that write src ... │ D2D snapshot src → scratch │ record ready │ next kernels ...
//   copy stream:                                    wait ready │ D2H scratch → pinned │ record done
//   libuv pool thread:                                             cudaEventSynchronize(done) │ memcpy pinned → dst
//   JS thread:                                                                                      resolve(promise)
//
// Why the snapshot: kernels queued after downloadAsync may overwrite src in place (AdamW, gradient
// accumulation) or reuse its block once JS frees it (the pool is stream-ordered on the compute stream only).
// A device-to-device copy on the compute stream costs microseconds (~3 TB/s) and makes the result exactly
// "src as of the call", whatever is queued afterwards. The scratch block goes back to the pool only after the
// copy stream has finished reading it. Pinned host staging (cudaHostAlloc) makes the D2H a true DMA that
// overlaps the compute stream; pinned blocks are cached by size, as device blocks are (cudaHostAlloc is slow).
// The last memcpy into the JS array's memory runs on the pool thread, so the event loop never copies bytes.
#define NAPI_VERSION 8
#define NODE_ADDON_API_CPP_EXCEPTIONS
#include <napi.h>

#include "common.h"

#include <cstring>
#include <map>
#include <mutex>

namespace dq {

Napi::Error toJsError(Napi::Env env, const std::exception& e);  // addon.cpp

static cudaStream_t g_copyStream = nullptr;

namespace {
std::mutex pinnedMu;
std::multimap<size_t, void*> pinnedFree;  // rounded size -> pinned host block
size_t pinnedCached = 0;

size_t roundPinned(size_t n) {
  const size_t g = size_t(1) << 20;
  return n == 0 ? g : (n + g - 1) / g * g;
}

struct Pinned {
  void* p;
  size_t size;
};

Pinned pinnedAcquire(size_t bytes) {
  size_t need = roundPinned(bytes);
  {
    std::lock_guard<std::mutex> lock(pinnedMu);
    auto it = pinnedFree.lower_bound(need);
    if (it != pinnedFree.end() && it->first <= need * 2) {
      Pinned r{it->second, it->first};
      pinnedCached -= it->first;
      pinnedFree.erase(it);
      return r;
    }
  }
  void* p = nullptr;
  CUDA_CHECK(cudaHostAlloc(&p, need, cudaHostAllocDefault));
  return Pinned{p, need};
}

// Keeps at most 1 GiB of pinned staging cached (page-locked memory is taken from the whole machine).
void pinnedRelease(Pinned b) {
  std::lock_guard<std::mutex> lock(pinnedMu);
  if (pinnedCached + b.size > (size_t(1) << 30)) {
    cudaFreeHost(b.p);
    return;
  }
  pinnedFree.emplace(b.size, b.p);
  pinnedCached += b.size;
}

// One pending download: owns the scratch block, the pinned staging and the two events until it completes.
class DownloadWorker : public Napi::AsyncWorker {
 public:
  DownloadWorker(Napi::Env env, Napi::TypedArray dst, void* dstData, size_t bytes, int device, void* scratch,
                 Pinned pinned, cudaEvent_t ready, cudaEvent_t done)
      : Napi::AsyncWorker(env, "dqlora.downloadAsync"),
        deferred_(Napi::Promise::Deferred::New(env)),
        dstRef_(Napi::Persistent(dst)),
        dstData_(dstData),
        bytes_(bytes),
        device_(device),
        scratch_(scratch),
        pinned_(pinned),
        ready_(ready),
        done_(done) {}

  Napi::Promise promise() { return deferred_.Promise(); }

  // Pool thread: wait for the copy stream, then move the bytes into the JS array's memory (the array is
  // kept alive by dstRef_; JS only sees it once the promise resolves).
  void Execute() override {
    cudaError_t e = cudaSetDevice(device_);
    if (e == cudaSuccess) e = cudaEventSynchronize(done_);
    if (e != cudaSuccess) {
      SetError(std::string("dqlora cuda: downloadAsync: waiting for the copy failed: ") + cudaGetErrorName(e) + " (" +
               cudaGetErrorString(e) + ")");
    } else if (bytes_ > 0) {
      std::memcpy(dstData_, pinned_.p, bytes_);
    }
    release();
  }

  void OnOK() override { deferred_.Resolve(Env().Undefined()); }
  void OnError(const Napi::Error& err) override { deferred_.Reject(err.Value()); }

 private:
  void release() {
    if (scratch_) poolFree(scratch_);  // the copy stream is done with it (or failed): safe to reuse
    scratch_ = nullptr;
    pinnedRelease(pinned_);
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
  }

  Napi::Promise::Deferred deferred_;
  Napi::Reference<Napi::TypedArray> dstRef_;
  void* dstData_;
  size_t bytes_;
  int device_;
  void* scratch_;
  Pinned pinned_;
  cudaEvent_t ready_, done_;
};

}  // namespace

/** The stream device → host copies run on, created on first use (non-blocking w.r.t. the legacy stream). */
static cudaStream_t copyStream() {
  if (!g_copyStream) CUDA_CHECK(cudaStreamCreateWithFlags(&g_copyStream, cudaStreamNonBlocking));
  return g_copyStream;
}

/** Frees the cached pinned staging blocks (called with the device pool's trim). */
void pinnedTrim() {
  std::lock_guard<std::mutex> lock(pinnedMu);
  for (auto& kv : pinnedFree) cudaFreeHost(kv.second);
  pinnedFree.clear();
  pinnedCached = 0;
}

// downloadAsync(src, dst: TypedArray) → Promise<void>: dst receives src's bytes as of this call's place in the
// compute stream. Argument errors and failures to queue throw synchronously; a failure of the copy itself
// rejects the promise.
Napi::Value downloadAsyncJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsTypedArray())
      throw Error("downloadAsync(src, dst): expected a device pointer and a typed array");
    void* src = reinterpret_cast<void*>(static_cast<uintptr_t>(info[0].As<Napi::Number>().DoubleValue()));
    Napi::TypedArray dst = info[1].As<Napi::TypedArray>();
    uint8_t* dstData = static_cast<uint8_t*>(dst.ArrayBuffer().Data()) + dst.ByteOffset();
    size_t bytes = dst.ByteLength();
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    cudaStream_t compute = stream(), copy = copyStream();

    void* scratch = bytes ? poolAlloc(bytes) : nullptr;
    Pinned pinned{nullptr, 0};
    cudaEvent_t ready = nullptr, done = nullptr;
    try {
      pinned = pinnedAcquire(bytes);
      CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
      // Blocking sync: the pool thread sleeps until the copy is done instead of spinning a core meanwhile.
      CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming | cudaEventBlockingSync));
      if (bytes) CUDA_CHECK(cudaMemcpyAsync(scratch, src, bytes, cudaMemcpyDeviceToDevice, compute));
      CUDA_CHECK(cudaEventRecord(ready, compute));
      CUDA_CHECK(cudaStreamWaitEvent(copy, ready, 0));
      if (bytes) CUDA_CHECK(cudaMemcpyAsync(pinned.p, scratch, bytes, cudaMemcpyDeviceToHost, copy));
      CUDA_CHECK(cudaEventRecord(done, copy));
    } catch (...) {
      // Nothing reads scratch once queueing failed, but an already-queued D2D might still write it: wait.
      cudaStreamSynchronize(compute);
      cudaStreamSynchronize(copy);
      if (scratch) poolFree(scratch);
      if (pinned.p) pinnedRelease(pinned);
      if (ready) cudaEventDestroy(ready);
      if (done) cudaEventDestroy(done);
      throw;
    }
    auto* w = new DownloadWorker(env, dst, dstData, bytes, device, scratch, pinned, ready, done);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw toJsError(env, e);
  }
}

}  // namespace dq
