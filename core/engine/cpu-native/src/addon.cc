// Node-API surface of the cpu kernels; declared for TypeScript in core/engine/cpu/native.ts. Every argument is
// checked here (types, and that each array holds every element the kernel will touch), so a wrong call throws a
// JS TypeError/RangeError instead of reading or writing out of bounds.
#include <napi.h>
#include <string>
#include "kernels.h"
#include "elementwise.h"

namespace {

using dq::ASrc;
using dq::BSrc;

template <typename T, napi_typedarray_type KIND>
T* arr(const Napi::CallbackInfo& info, int i, const char* name, long need) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != KIND)
    throw Napi::TypeError::New(info.Env(), std::string("argument ") + name + " has the wrong type (expected a specific typed array)");
  auto ta = v.As<Napi::TypedArrayOf<T>>();
  if (need < 0 || (long)ta.ElementLength() < need)
    throw Napi::RangeError::New(info.Env(), std::string("argument ") + name + " holds " + std::to_string(ta.ElementLength()) +
                                              " elements, the call needs " + std::to_string(need));
  return ta.Data();
}
float* f32(const Napi::CallbackInfo& info, int i, const char* name, long need) { return arr<float, napi_float32_array>(info, i, name, need); }
int32_t* i32(const Napi::CallbackInfo& info, int i, const char* name, long need) { return arr<int32_t, napi_int32_array>(info, i, name, need); }
uint8_t* u8(const Napi::CallbackInfo& info, int i, const char* name, long need) { return arr<uint8_t, napi_uint8_array>(info, i, name, need); }

double num(const Napi::CallbackInfo& info, int i, const char* name) {
  if (!info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string("argument ") + name + " must be a number");
  return info[i].As<Napi::Number>().DoubleValue();
}
long dim(const Napi::CallbackInfo& info, int i, const char* name) {
  double d = num(info, i, name);
  if (!(d >= 0 && d <= 2147483647.0) || d != (double)(long)d)
    throw Napi::RangeError::New(info.Env(), std::string("argument ") + name + " must be a non-negative int32");
  return (long)d;
}
bool flag(const Napi::CallbackInfo& info, int i) { return info[i].ToBoolean().Value(); }
int threads(const Napi::CallbackInfo& info, int i) { return (int)std::max(1L, std::min((long)dq::kMaxThreads, dim(info, i, "threads"))); }
/** Elements spanned by a [rows, cols] matrix with leading dimension ld. */
long span(long rows, long cols, long ld) { return rows == 0 || cols == 0 ? 0 : (rows - 1) * ld + cols; }

// sgemm(transA, transB, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc, threads)
Napi::Value Sgemm(const Napi::CallbackInfo& info) {
  bool ta = flag(info, 0), tb = flag(info, 1);
  long M = dim(info, 2, "M"), N = dim(info, 3, "N"), K = dim(info, 4, "K");
  float alpha = (float)num(info, 5, "alpha");
  long lda = dim(info, 7, "lda"), ldb = dim(info, 9, "ldb"), ldc = dim(info, 12, "ldc");
  if ((!ta && lda < K) || (ta && lda < M) || (!tb && ldb < N) || (tb && ldb < K) || ldc < N)
    throw Napi::RangeError::New(info.Env(), "sgemm: a leading dimension is smaller than its row");
  float* a = f32(info, 6, "a", ta ? span(K, M, lda) : span(M, K, lda));
  float* b = f32(info, 8, "b", tb ? span(N, K, ldb) : span(K, N, ldb));
  float beta = (float)num(info, 10, "beta");
  float* c = f32(info, 11, "c", span(M, N, ldc));
  ASrc A = ta ? ASrc{a, 1, lda} : ASrc{a, lda, 1};
  BSrc B; B.b = b;
  if (tb) { B.rs = 1; B.cs = ldb; } else { B.rs = ldb; B.cs = 1; }
  dq::gemmParallel((int)M, (int)N, (int)K, alpha, A, B, beta, c, ldc, threads(info, 13));
  return info.Env().Undefined();
}

// nf4Gemm(transW, M, out, in, x, packed, absmax, table, blocksize, beta, c, threads)
Napi::Value Nf4Gemm(const Napi::CallbackInfo& info) {
  bool tw = flag(info, 0);
  long M = dim(info, 1, "M"), O = dim(info, 2, "out"), I = dim(info, 3, "in");
  long bs = dim(info, 8, "blocksize");
  if (bs == 0) throw Napi::RangeError::New(info.Env(), "nf4Gemm: blocksize must be positive");
  long K = tw ? I : O, N = tw ? O : I;
  float* x = f32(info, 4, "x", M * K);
  BSrc B;
  B.packed = u8(info, 5, "packed", (O * I + 1) / 2);
  B.absmax = f32(info, 6, "absmax", (O * I + bs - 1) / bs);
  B.table = f32(info, 7, "table", 16);
  B.bs = (int)bs;
  B.bshift = (bs & (bs - 1)) == 0 ? __builtin_ctzl(bs) : -1;
  if (tw) { B.fk = 1; B.fj = I; } else { B.fk = I; B.fj = 1; }  // flat W index of B'(k, j)
  float beta = (float)num(info, 9, "beta");
  float* c = f32(info, 10, "c", M * N);
  dq::gemmParallel((int)M, (int)N, (int)K, 1.0f, ASrc{x, K, 1}, B, beta, c, N, threads(info, 11));
  return info.Env().Undefined();
}

dq::AttnDims attnDims(const Napi::CallbackInfo& info, int i) {
  dq::AttnDims d{(int)dim(info, i, "B"), (int)dim(info, i + 1, "T"), (int)dim(info, i + 2, "Hq"), (int)dim(info, i + 3, "Hk"), (int)dim(info, i + 4, "D")};
  if (d.Hk == 0 || d.Hq % d.Hk != 0) throw Napi::RangeError::New(info.Env(), "attention: Hq must be a multiple of Hk");
  return d;
}

// attentionForward(q, k, v, mask, B, T, Hq, Hk, D, scale, out, lse, threads)
Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
  dq::AttnDims d = attnDims(info, 4);
  long nq = (long)d.B * d.T * d.Hq * d.D, nk = (long)d.B * d.T * d.Hk * d.D;
  float* q = f32(info, 0, "q", nq); float* k = f32(info, 1, "k", nk); float* v = f32(info, 2, "v", nk);
  int32_t* m = i32(info, 3, "keyMask", (long)d.B * d.T);
  float scale = (float)num(info, 9, "scale");
  float* out = f32(info, 10, "out", nq); float* lse = f32(info, 11, "lse", (long)d.B * d.Hq * d.T);
  dq::attentionForward(q, k, v, m, d, scale, out, lse, threads(info, 12));
  return info.Env().Undefined();
}

// attentionBackward(dout, q, k, v, mask, out, lse, B, T, Hq, Hk, D, scale, dq, dk, dv, threads)
Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  dq::AttnDims d = attnDims(info, 7);
  long nq = (long)d.B * d.T * d.Hq * d.D, nk = (long)d.B * d.T * d.Hk * d.D;
  float* g = f32(info, 0, "dout", nq); float* q = f32(info, 1, "q", nq);
  float* k = f32(info, 2, "k", nk); float* v = f32(info, 3, "v", nk);
  int32_t* m = i32(info, 4, "keyMask", (long)d.B * d.T);
  float* o = f32(info, 5, "out", nq); float* lse = f32(info, 6, "lse", (long)d.B * d.Hq * d.T);
  float scale = (float)num(info, 12, "scale");
  float* dqq = f32(info, 13, "dq", nq); float* dk = f32(info, 14, "dk", nk); float* dv = f32(info, 15, "dv", nk);
  dq::attentionBackward(g, q, k, v, m, o, lse, d, scale, dqq, dk, dv, threads(info, 16));
  return info.Env().Undefined();
}

// crossEntropy(logits, targets, N, V, rowLoss, dlogits|null, gradScale, threads)
Napi::Value CrossEntropy(const Napi::CallbackInfo& info) {
  long N = dim(info, 2, "N"), V = dim(info, 3, "V");
  float* x = f32(info, 0, "logits", N * V);
  int32_t* t = i32(info, 1, "targets", N);
  for (long n = 0; n < N; n++)
    if (t[n] != -100 && (t[n] < 0 || t[n] >= V)) throw Napi::RangeError::New(info.Env(), "crossEntropy: target outside [0, V)");
  float* rl = f32(info, 4, "rowLoss", N);
  float* dl = info[5].IsNull() || info[5].IsUndefined() ? nullptr : f32(info, 5, "dlogits", N * V);
  dq::crossEntropy(x, t, (int)N, (int)V, rl, dl, (float)num(info, 6, "gradScale"), threads(info, 7));
  return info.Env().Undefined();
}

// dropout(x, y, N, C, p, scale, k0, k1, stream, rowSample, rowPos, threads)
Napi::Value Dropout(const Napi::CallbackInfo& info) {
  long N = dim(info, 2, "N"), C = dim(info, 3, "C");
  float* x = f32(info, 0, "x", N * C); float* y = f32(info, 1, "y", N * C);
  auto u32 = [&](int i, const char* n) { return (uint32_t)(uint64_t)num(info, i, n); };
  dq::dropout(x, y, (int)N, (int)C, num(info, 4, "p"), (float)num(info, 5, "scale"), u32(6, "k0"), u32(7, "k1"), u32(8, "stream"),
              i32(info, 9, "rowSample", N), i32(info, 10, "rowPos", N), threads(info, 11));
  return info.Env().Undefined();
}

// ---- elementwise / normalisation (elementwise.h) ------------------------------------------------------------------

// swigluForward(gate, up, h, n, threads)
Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
  long n = dim(info, 3, "n");
  dq::swigluForward(f32(info, 0, "gate", n), f32(info, 1, "up", n), f32(info, 2, "h", n), n, threads(info, 4));
  return info.Env().Undefined();
}

// swigluBackward(dh, gate, up, dgate, dup, n, threads)
Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  long n = dim(info, 5, "n");
  dq::swigluBackward(f32(info, 0, "dh", n), f32(info, 1, "gate", n), f32(info, 2, "up", n), f32(info, 3, "dgate", n),
                     f32(info, 4, "dup", n), n, threads(info, 6));
  return info.Env().Undefined();
}

// axpy(a, b, alpha, n, threads): a += alpha · b
Napi::Value Axpy(const Napi::CallbackInfo& info) {
  long n = dim(info, 3, "n");
  dq::axpy(f32(info, 0, "a", n), f32(info, 1, "b", n), (float)num(info, 2, "alpha"), n, threads(info, 4));
  return info.Env().Undefined();
}

// scale(a, s, n, threads): a ·= s
Napi::Value Scale(const Napi::CallbackInfo& info) {
  long n = dim(info, 2, "n");
  dq::scale(f32(info, 0, "a", n), (float)num(info, 1, "s"), n, threads(info, 3));
  return info.Env().Undefined();
}

// sumSquares(x, n, threads) → number
Napi::Value SumSquares(const Napi::CallbackInfo& info) {
  long n = dim(info, 1, "n");
  return Napi::Number::New(info.Env(), dq::sumSquares(f32(info, 0, "x", n), n, threads(info, 2)));
}

// sumRows(x, N, C, out, threads)
Napi::Value SumRows(const Napi::CallbackInfo& info) {
  long N = dim(info, 1, "N"), C = dim(info, 2, "C");
  dq::sumRows(f32(info, 0, "x", N * C), N, C, f32(info, 3, "out", C), threads(info, 4));
  return info.Env().Undefined();
}

// rmsnormForward(x, w, N, H, eps, y, rstd, threads)
Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
  long N = dim(info, 2, "N"), H = dim(info, 3, "H");
  dq::rmsnormForward(f32(info, 0, "x", N * H), f32(info, 1, "w", H), N, H, num(info, 4, "eps"), f32(info, 5, "y", N * H),
                     f32(info, 6, "rstd", N), threads(info, 7));
  return info.Env().Undefined();
}

// rmsnormBackward(dy, x, w, rstd, N, H, dx, threads)
Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
  long N = dim(info, 4, "N"), H = dim(info, 5, "H");
  dq::rmsnormBackward(f32(info, 0, "dy", N * H), f32(info, 1, "x", N * H), f32(info, 2, "w", H), f32(info, 3, "rstd", N), N, H,
                      f32(info, 6, "dx", N * H), threads(info, 7));
  return info.Env().Undefined();
}

// rope(x, pos, invFreq, N, nh, D, rotaryDim, mscale, inverse, y, threads)
Napi::Value Rope(const Napi::CallbackInfo& info) {
  long N = dim(info, 3, "N"), nh = dim(info, 4, "nh"), D = dim(info, 5, "D"), rd = dim(info, 6, "rotaryDim");
  if (rd == 0 || rd % 2 != 0 || rd > D) throw Napi::RangeError::New(info.Env(), "rope: rotaryDim must be even, positive and ≤ D");
  float* x = f32(info, 0, "x", N * nh * D);
  int32_t* pos = i32(info, 1, "pos", N);
  float* inv = f32(info, 2, "invFreq", rd / 2);
  dq::rope(x, pos, inv, N, nh, D, rd, (float)num(info, 7, "mscale"), flag(info, 8), f32(info, 9, "y", N * nh * D), threads(info, 10));
  return info.Env().Undefined();
}

// adamw(p, g, m, v, n, decay, w1, b2, w2, bc2s, stepSize, eps, weightDecayOn, threads); scalars already float32 values
Napi::Value Adamw(const Napi::CallbackInfo& info) {
  long n = dim(info, 4, "n");
  dq::AdamArgs h{};
  h.decay = (float)num(info, 5, "decay"); h.w1 = (float)num(info, 6, "w1"); h.b2 = (float)num(info, 7, "b2");
  h.w2 = (float)num(info, 8, "w2"); h.bc2s = (float)num(info, 9, "bc2s"); h.stepSize = (float)num(info, 10, "stepSize");
  h.eps = (float)num(info, 11, "eps"); h.wd = flag(info, 12);
  dq::adamw(f32(info, 0, "p", n), f32(info, 1, "g", n), f32(info, 2, "m", n), f32(info, 3, "v", n), n, h, threads(info, 13));
  return info.Env().Undefined();
}

// embedding(ids, table, N, V, H, out, threads) → index of the first id outside [0, V), or −1 (then out is written)
Napi::Value Embedding(const Napi::CallbackInfo& info) {
  long N = dim(info, 2, "N"), V = dim(info, 3, "V"), H = dim(info, 4, "H");
  int32_t* ids = i32(info, 0, "ids", N);
  for (long n = 0; n < N; n++)
    if (ids[n] < 0 || ids[n] >= V) return Napi::Number::New(info.Env(), (double)n);
  dq::embedding(ids, f32(info, 1, "table", V * H), N, H, f32(info, 5, "out", N * H), threads(info, 6));
  return Napi::Number::New(info.Env(), -1);
}

Napi::Value PeakGflops(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), dq::peakGflops(num(info, 0, "ms"), threads(info, 1)));
}

Napi::Value Isa(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), dq::kern().name); }

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("isa", Napi::Function::New(env, Isa));
  exports.Set("sgemm", Napi::Function::New(env, Sgemm));
  exports.Set("nf4Gemm", Napi::Function::New(env, Nf4Gemm));
  exports.Set("attentionForward", Napi::Function::New(env, AttentionForward));
  exports.Set("attentionBackward", Napi::Function::New(env, AttentionBackward));
  exports.Set("crossEntropy", Napi::Function::New(env, CrossEntropy));
  exports.Set("dropout", Napi::Function::New(env, Dropout));
  exports.Set("swigluForward", Napi::Function::New(env, SwigluForward));
  exports.Set("swigluBackward", Napi::Function::New(env, SwigluBackward));
  exports.Set("axpy", Napi::Function::New(env, Axpy));
  exports.Set("scale", Napi::Function::New(env, Scale));
  exports.Set("sumSquares", Napi::Function::New(env, SumSquares));
  exports.Set("sumRows", Napi::Function::New(env, SumRows));
  exports.Set("rmsnormForward", Napi::Function::New(env, RmsnormForward));
  exports.Set("rmsnormBackward", Napi::Function::New(env, RmsnormBackward));
  exports.Set("rope", Napi::Function::New(env, Rope));
  exports.Set("adamw", Napi::Function::New(env, Adamw));
  exports.Set("embedding", Napi::Function::New(env, Embedding));
  exports.Set("peakGflops", Napi::Function::New(env, PeakGflops));
  return exports;
}

}  // namespace

NODE_API_MODULE(dqlora_cpu, Init)
