// Node-API surface of the CUDA backend. Every export takes plain numbers (device pointers travel as JS numbers:
// x86-64 device addresses are < 2^53) and typed arrays; core/engine/cuda/native.ts declares them all.
// Every entry point catches C++ exceptions (dq::Error from CUDA_CHECK & co., std::bad_alloc) and rethrows them
// as JS Errors, so a CUDA failure never aborts the process.
#define NAPI_VERSION 8
#define NODE_ADDON_API_CPP_EXCEPTIONS
#include <napi.h>

#include "ops.h"

#include <cstring>
#include <vector>

using namespace dq;

namespace dq {
Napi::Value downloadAsyncJs(const Napi::CallbackInfo& info);  // download_async.cpp
void pinnedTrim();

// The JS error of a C++ exception: "dqlora cuda: <what>"; an OutOfMemory also gets code 'DQLORA_OOM' (the value
// of OUT_OF_MEMORY_CODE in common/errors.ts) and requestedBytes, so it is recognised without parsing the message.
Napi::Error toJsError(Napi::Env env, const std::exception& e) {
  Napi::Error err = Napi::Error::New(env, std::string("dqlora cuda: ") + e.what());
  if (auto* oom = dynamic_cast<const OutOfMemory*>(&e)) {
    err.Set("code", Napi::String::New(env, "DQLORA_OOM"));
    err.Set("requestedBytes", Napi::Number::New(env, (double)oom->requested));
  }
  return err;
}
}  // namespace dq

namespace {

bool g_ready = false;

void* ptrArg(const Napi::CallbackInfo& info, size_t i) {
  double d = info[i].As<Napi::Number>().DoubleValue();
  return reinterpret_cast<void*>(static_cast<uintptr_t>(d));
}
int64_t intArg(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().Int64Value(); }
int dtArg(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().Int32Value(); }
float fArg(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().FloatValue(); }
double dArg(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().DoubleValue(); }
bool bArg(const Napi::CallbackInfo& info, size_t i) { return info[i].ToBoolean().Value(); }
Napi::Value ptrVal(Napi::Env env, const void* p) { return Napi::Number::New(env, (double)reinterpret_cast<uintptr_t>(p)); }

struct Bytes { void* data; size_t size; };
// The typed array's bytes. napi_get_typedarray_info gives the data pointer of arrays over a SharedArrayBuffer too
// (the all-reduce's gradient buckets), where an ArrayBuffer handle (Napi::TypedArray::ArrayBuffer) is refused.
Bytes viewArg(const Napi::CallbackInfo& info, size_t i) {
  if (!info[i].IsTypedArray()) throw Error("argument " + std::to_string(i) + " must be a typed array");
  Napi::TypedArray t = info[i].As<Napi::TypedArray>();
  void* data = nullptr;
  if (napi_get_typedarray_info(info.Env(), t, nullptr, nullptr, &data, nullptr, nullptr) != napi_ok || (data == nullptr && t.ByteLength() > 0))
    throw Error("argument " + std::to_string(i) + ": cannot read the typed array's memory");
  return {static_cast<uint8_t*>(data), t.ByteLength()};
}

void requireReady() {
  if (!g_ready) throw Error("the CUDA backend is not initialised: call init() first");
}

// Wraps a body so that C++ exceptions become JS exceptions (out of memory: code 'DQLORA_OOM', see toJsError).
template <class F>
Napi::Value guard(const Napi::CallbackInfo& info, F body) {
  try {
    return body();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw dq::toJsError(info.Env(), e);
  }
}
#define FN(name) Napi::Value name(const Napi::CallbackInfo& info) { return guard(info, [&]() -> Napi::Value {
#define END_FN }); }

FN(deviceCount)
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  Napi::Object o = Napi::Object::New(info.Env());
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    o.Set("count", 0);
    o.Set("error", std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e));
  } else {
    o.Set("count", n);
  }
  return o;
END_FN

FN(init)
  int dev = info.Length() > 0 && info[0].IsNumber() ? dtArg(info, 0) : 0;
  CUDA_CHECK(cudaSetDevice(dev));
  initStream();
  std::string lt = gemmInit();
  cudaDeviceProp p;
  CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  g_ready = true;
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("name", std::string(p.name));
  o.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
  o.Set("totalMemory", (double)p.totalGlobalMem);
  o.Set("multiprocessors", p.multiProcessorCount);
  o.Set("cublasLt", lt);
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  o.Set("runtimeVersion", rt);
  o.Set("driverVersion", drv);
  return o;
END_FN

FN(allocJs)
  requireReady();
  return ptrVal(info.Env(), poolAlloc((size_t)intArg(info, 0)));
END_FN

FN(freeJs)
  requireReady();
  poolFree(ptrArg(info, 0));
  return info.Env().Undefined();
END_FN

// upload(dst, typedArray): synchronous, so the JS array may be reused at once.
FN(upload)
  requireReady();
  Bytes b = viewArg(info, 1);
  CUDA_CHECK(cudaMemcpyAsync(ptrArg(info, 0), b.data, b.size, cudaMemcpyHostToDevice, stream()));
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  return info.Env().Undefined();
END_FN

FN(download)
  requireReady();
  Bytes b = viewArg(info, 1);
  CUDA_CHECK(cudaMemcpyAsync(b.data, ptrArg(info, 0), b.size, cudaMemcpyDeviceToHost, stream()));
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  return info.Env().Undefined();
END_FN

FN(memsetZero)
  requireReady();
  CUDA_CHECK(cudaMemsetAsync(ptrArg(info, 0), 0, (size_t)intArg(info, 1), stream()));
  return info.Env().Undefined();
END_FN

FN(copy)
  requireReady();
  CUDA_CHECK(cudaMemcpyAsync(ptrArg(info, 0), ptrArg(info, 1), (size_t)intArg(info, 2), cudaMemcpyDeviceToDevice, stream()));
  return info.Env().Undefined();
END_FN

FN(synchronize)
  requireReady();
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  return info.Env().Undefined();
END_FN

FN(poolStatsJs)
  PoolStats s = poolStats();
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("inUse", (double)s.inUse);
  o.Set("cached", (double)s.cached);
  o.Set("peakInUse", (double)s.peakInUse);
  o.Set("reserved", (double)s.reserved);
  o.Set("peakReserved", (double)s.peakReserved);
  o.Set("liveBlocks", (double)s.liveBlocks);
  size_t freeB = 0, totalB = 0;
  if (g_ready && cudaMemGetInfo(&freeB, &totalB) == cudaSuccess) {
    o.Set("deviceFree", (double)freeB);
    o.Set("deviceTotal", (double)totalB);
  }
  return o;
END_FN

FN(poolTrimJs)
  requireReady();
  poolTrim();
  pinnedTrim();
  return info.Env().Undefined();
END_FN

FN(poolSetLimitJs)
  poolSetLimit((size_t)intArg(info, 0));
  return info.Env().Undefined();
END_FN

FN(poolResetPeakJs)
  poolResetPeak();
  return info.Env().Undefined();
END_FN

FN(convertJs)
  requireReady();
  convert(ptrArg(info, 0), dtArg(info, 1), ptrArg(info, 2), dtArg(info, 3), (size_t)intArg(info, 4));
  return info.Env().Undefined();
END_FN

// matmul(a, b, abDt, d, dDt, M, N, K, transA, transB, alpha, beta)
FN(matmul)
  requireReady();
  gemm(ptrArg(info, 0), dtArg(info, 2), ptrArg(info, 1), ptrArg(info, 3), dtArg(info, 4), intArg(info, 5),
       intArg(info, 6), intArg(info, 7), bArg(info, 8), bArg(info, 9), fArg(info, 10), fArg(info, 11));
  return info.Env().Undefined();
END_FN

FN(axpyJs)
  requireReady();
  axpy(ptrArg(info, 0), dtArg(info, 1), ptrArg(info, 2), dtArg(info, 3), (size_t)intArg(info, 4), fArg(info, 5));
  return info.Env().Undefined();
END_FN

FN(scaleJs)
  requireReady();
  scale(ptrArg(info, 0), dtArg(info, 1), (size_t)intArg(info, 2), fArg(info, 3));
  return info.Env().Undefined();
END_FN

FN(sumSquaresJs)
  requireReady();
  return Napi::Number::New(info.Env(), sumSquares(ptrArg(info, 0), dtArg(info, 1), (size_t)intArg(info, 2)));
END_FN

FN(sumRowsJs)
  requireReady();
  sumRows(ptrArg(info, 0), dtArg(info, 1), intArg(info, 2), intArg(info, 3), (float*)ptrArg(info, 4));
  return info.Env().Undefined();
END_FN

FN(addBiasJs)
  requireReady();
  addBias(ptrArg(info, 0), dtArg(info, 1), ptrArg(info, 2), dtArg(info, 3), intArg(info, 4), intArg(info, 5));
  return info.Env().Undefined();
END_FN

FN(scaleColumnsJs)
  requireReady();
  scaleColumns(ptrArg(info, 0), ptrArg(info, 1), dtArg(info, 2), (const float*)ptrArg(info, 3), intArg(info, 4), intArg(info, 5));
  return info.Env().Undefined();
END_FN

FN(columnDotJs)
  requireReady();
  columnDot(ptrArg(info, 0), dtArg(info, 1), ptrArg(info, 2), dtArg(info, 3), intArg(info, 4), intArg(info, 5), (float*)ptrArg(info, 6));
  return info.Env().Undefined();
END_FN

FN(swigluJs)
  requireReady();
  swiglu(ptrArg(info, 0), ptrArg(info, 1), ptrArg(info, 2), dtArg(info, 3), (size_t)intArg(info, 4));
  return info.Env().Undefined();
END_FN

FN(swigluBackwardJs)
  requireReady();
  swigluBackward(ptrArg(info, 0), ptrArg(info, 1), ptrArg(info, 2), ptrArg(info, 3), ptrArg(info, 4), dtArg(info, 5),
                 (size_t)intArg(info, 6));
  return info.Env().Undefined();
END_FN

// dropout(x, y, dt, N, C, threshold24, scale, k0, k1, streamWord, rowSample Int32Array, rowPos Int32Array)
FN(dropoutJs)
  requireReady();
  int64_t N = intArg(info, 3);
  Bytes rs = viewArg(info, 10), rp = viewArg(info, 11);
  if (rs.size != (size_t)N * 4 || rp.size != (size_t)N * 4) throw Error("dropout: rowSample/rowPos must have N entries");
  Scratch dRs(rs.size), dRp(rp.size);
  if (N > 0) {
    CUDA_CHECK(cudaMemcpyAsync(dRs.p, rs.data, rs.size, cudaMemcpyHostToDevice, stream()));
    CUDA_CHECK(cudaMemcpyAsync(dRp.p, rp.data, rp.size, cudaMemcpyHostToDevice, stream()));
  }
  dropout(ptrArg(info, 0), ptrArg(info, 1), dtArg(info, 2), N, intArg(info, 4), (uint32_t)intArg(info, 5),
          fArg(info, 6), (uint32_t)intArg(info, 7), (uint32_t)intArg(info, 8), (uint32_t)intArg(info, 9),
          dRs.as<int32_t>(), dRp.as<int32_t>());
  return info.Env().Undefined();
END_FN

// adamw(p, g, m, v, n, lr, beta1, beta2, eps, decay, stepSize, bc2Sqrt)
FN(adamwJs)
  requireReady();
  adamw((float*)ptrArg(info, 0), (const float*)ptrArg(info, 1), (float*)ptrArg(info, 2), (float*)ptrArg(info, 3),
        (size_t)intArg(info, 4), fArg(info, 5), fArg(info, 6), fArg(info, 7), fArg(info, 8), fArg(info, 9),
        fArg(info, 10), fArg(info, 11));
  return info.Env().Undefined();
END_FN

FN(embeddingJs)
  requireReady();
  int bad = embedding((const int32_t*)ptrArg(info, 0), ptrArg(info, 1), dtArg(info, 2), ptrArg(info, 3), dtArg(info, 4),
                      intArg(info, 5), intArg(info, 6), intArg(info, 7));
  return Napi::Number::New(info.Env(), bad);
END_FN

// rmsnorm(x, xDt, w, wDt, y, rstd, N, H, eps)
FN(rmsnormJs)
  requireReady();
  rmsnorm(ptrArg(info, 0), dtArg(info, 1), ptrArg(info, 2), dtArg(info, 3), ptrArg(info, 4), (float*)ptrArg(info, 5),
          intArg(info, 6), intArg(info, 7), fArg(info, 8));
  return info.Env().Undefined();
END_FN

// rmsnormBackward(dy, x, xDt, w, wDt, rstd, dx, N, H)
FN(rmsnormBackwardJs)
  requireReady();
  rmsnormBackward(ptrArg(info, 0), ptrArg(info, 1), dtArg(info, 2), ptrArg(info, 3), dtArg(info, 4),
                  (const float*)ptrArg(info, 5), ptrArg(info, 6), intArg(info, 7), intArg(info, 8));
  return info.Env().Undefined();
END_FN

// rope(x, y, dt, pos, invFreq, N, nh, D, rotaryDim, mscale, inverse)
FN(ropeJs)
  requireReady();
  rope(ptrArg(info, 0), ptrArg(info, 1), dtArg(info, 2), (const int32_t*)ptrArg(info, 3), (const float*)ptrArg(info, 4),
       intArg(info, 5), intArg(info, 6), intArg(info, 7), intArg(info, 8), fArg(info, 9), bArg(info, 10));
  return info.Env().Undefined();
END_FN

// nf4Dequant(packed, absmax, absmaxU8, nestedAbsmax, nestedMap, offset, quantMap, n, blocksize, nestedBlocksize, out, outDt)
FN(nf4DequantJs)
  requireReady();
  Nf4Dev w;
  w.packed = (const uint8_t*)ptrArg(info, 0);
  w.absmax = ptrArg(info, 1);
  w.absmaxU8 = bArg(info, 2);
  w.nestedAbsmax = (const float*)ptrArg(info, 3);
  w.nestedMap = (const float*)ptrArg(info, 4);
  w.offset = fArg(info, 5);
  w.quantMap = (const float*)ptrArg(info, 6);
  w.n = intArg(info, 7);
  w.blocksize = (int)intArg(info, 8);
  w.nestedBlocksize = (int)intArg(info, 9);
  nf4Dequant(w, ptrArg(info, 10), dtArg(info, 11));
  return info.Env().Undefined();
END_FN

// nf4Quantize(w, wDt, n, blocksize, packed, absmax)
FN(nf4QuantizeJs)
  requireReady();
  nf4Quantize(ptrArg(info, 0), dtArg(info, 1), intArg(info, 2), (int)intArg(info, 3), (uint8_t*)ptrArg(info, 4),
              (float*)ptrArg(info, 5));
  return info.Env().Undefined();
END_FN

// nf4DoubleQuant(absmax, nb, offset, map256, nestedBlocksize, codes, nestedAbsmax)
FN(nf4DoubleQuantJs)
  requireReady();
  nf4DoubleQuant((const float*)ptrArg(info, 0), intArg(info, 1), fArg(info, 2), (const float*)ptrArg(info, 3),
                 (int)intArg(info, 4), (uint8_t*)ptrArg(info, 5), (float*)ptrArg(info, 6));
  return info.Env().Undefined();
END_FN

// attentionForward(q, k, v, mask, out, lse, B, T, Hq, Hk, D, scale)
FN(attentionForwardJs)
  requireReady();
  attentionForward(ptrArg(info, 0), ptrArg(info, 1), ptrArg(info, 2), (const int32_t*)ptrArg(info, 3), ptrArg(info, 4),
                   (float*)ptrArg(info, 5), (int)intArg(info, 6), (int)intArg(info, 7), (int)intArg(info, 8),
                   (int)intArg(info, 9), (int)intArg(info, 10), fArg(info, 11));
  return info.Env().Undefined();
END_FN

// attentionBackward(dout, q, k, v, mask, out, lse, dq, dk, dv, B, T, Hq, Hk, D, scale)
FN(attentionBackwardJs)
  requireReady();
  attentionBackward(ptrArg(info, 0), ptrArg(info, 1), ptrArg(info, 2), ptrArg(info, 3), (const int32_t*)ptrArg(info, 4),
                    ptrArg(info, 5), (const float*)ptrArg(info, 6), ptrArg(info, 7), ptrArg(info, 8), ptrArg(info, 9),
                    (int)intArg(info, 10), (int)intArg(info, 11), (int)intArg(info, 12), (int)intArg(info, 13),
                    (int)intArg(info, 14), fArg(info, 15));
  return info.Env().Undefined();
END_FN

// crossEntropy(logits, dt, targets, N, V, wantGrad, gradScale, dlogits, dDt) -> [lossSum, count, badTargets]
FN(crossEntropyJs)
  requireReady();
  CeResult r = crossEntropy(ptrArg(info, 0), dtArg(info, 1), (const int32_t*)ptrArg(info, 2), intArg(info, 3),
                            intArg(info, 4), bArg(info, 5), fArg(info, 6), ptrArg(info, 7), dtArg(info, 8));
  Napi::Array a = Napi::Array::New(info.Env(), 3);
  a.Set(0u, r.lossSum);
  a.Set(1u, (double)r.count);
  a.Set(2u, (double)r.badTargets);
  return a;
END_FN

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
#define EXPORT(js, fn) exports.Set(js, Napi::Function::New(env, fn, js))
  EXPORT("deviceCount", deviceCount);
  EXPORT("init", init);
  EXPORT("alloc", allocJs);
  EXPORT("free", freeJs);
  EXPORT("upload", upload);
  EXPORT("download", download);
  EXPORT("downloadAsync", dq::downloadAsyncJs);
  EXPORT("memsetZero", memsetZero);
  EXPORT("copy", copy);
  EXPORT("synchronize", synchronize);
  EXPORT("poolStats", poolStatsJs);
  EXPORT("poolTrim", poolTrimJs);
  EXPORT("poolResetPeak", poolResetPeakJs);
  EXPORT("poolSetLimit", poolSetLimitJs);
  EXPORT("convert", convertJs);
  EXPORT("matmul", matmul);
  EXPORT("axpy", axpyJs);
  EXPORT("scale", scaleJs);
  EXPORT("sumSquares", sumSquaresJs);
  EXPORT("sumRows", sumRowsJs);
  EXPORT("addBias", addBiasJs);
  EXPORT("scaleColumns", scaleColumnsJs);
  EXPORT("columnDot", columnDotJs);
  EXPORT("swiglu", swigluJs);
  EXPORT("swigluBackward", swigluBackwardJs);
  EXPORT("dropout", dropoutJs);
  EXPORT("adamw", adamwJs);
  EXPORT("embedding", embeddingJs);
  EXPORT("rmsnorm", rmsnormJs);
  EXPORT("rmsnormBackward", rmsnormBackwardJs);
  EXPORT("rope", ropeJs);
  EXPORT("nf4Dequant", nf4DequantJs);
  EXPORT("nf4Quantize", nf4QuantizeJs);
  EXPORT("nf4DoubleQuant", nf4DoubleQuantJs);
  EXPORT("attentionForward", attentionForwardJs);
  EXPORT("attentionBackward", attentionBackwardJs);
  EXPORT("crossEntropy", crossEntropyJs);
#undef EXPORT
  return exports;
}

NODE_API_MODULE(dqlora_cuda, Init)
