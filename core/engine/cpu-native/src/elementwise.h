// Elementwise and normalisation kernels of the cpu backend: swiglu (fwd/bwd), rmsnorm (fwd/bwd), rope, axpy, scale,
// sumSquares, sumRows, adamw, embedding. Semantics are those of core/engine/cpu.ts (the TypeScript twins, which the
// tests compare against).
//
// Each kernel is written once as plain scalar C++ over a chunk [i0, i1) of elements or rows, in a branch-free form
// the compiler auto-vectorises, and compiled three times (AVX-512, AVX2, baseline x86-64 / any CPU) through
// DQ_CLONES; the copy is picked with the GEMM's kern() ISA (DQLORA_CPU_ISA overrides it). -ffp-contract=off (see
// build.mjs) keeps a·b + c as two roundings, so all three copies give the same bits, and most kernels give exactly
// the bits of the TypeScript kernel (axpy, scale, adamw, rope, rmsnorm's y for a given rstd, sumRows). Where the
// TS kernel sums in float64 sequentially, the native one sums in float64 too, in 8 interleaved lanes (lane k takes
// elements k, k+8, ...; lanes are added in order), so only the summation order differs (≈1e-16 relative).
//
// Threading: jobs are fixed chunks of elements/rows (independent of the thread count), every output element is
// written by exactly one job, and the only cross-job reduction (sumSquares) adds per-chunk float64 partials in
// chunk order. So the bits are the same for any thread count.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "gemm.h"

namespace dq {

#define DQ_INLINE inline __attribute__((always_inline))

#ifdef DQ_X86
// Target sets are exactly what kern() checks (avx512f; avx2 + fma), so a clone never runs on a CPU lacking its ISA.
#define DQ_CLONES(NAME, ARGS)                                                                                   \
  __attribute__((target("avx512f"))) static void NAME##512(const ARGS& a, long i0, long i1) { NAME(a, i0, i1); } \
  __attribute__((target("avx2,fma"))) static void NAME##256(const ARGS& a, long i0, long i1) { NAME(a, i0, i1); } \
  static void NAME##Any(const ARGS& a, long i0, long i1) { NAME(a, i0, i1); }                                  \
  static inline ChunkFn<ARGS> NAME##Pick() {                                                                   \
    int l = isaLevel();                                                                                        \
    return l == 2 ? NAME##512 : l == 1 ? NAME##256 : NAME##Any;                                                \
  }
#else
#define DQ_CLONES(NAME, ARGS)                                                      \
  static void NAME##Any(const ARGS& a, long i0, long i1) { NAME(a, i0, i1); }    \
  static inline ChunkFn<ARGS> NAME##Pick() { return NAME##Any; }
#endif

template <class A>
using ChunkFn = void (*)(const A&, long, long);

/** 2 = AVX-512, 1 = AVX2, 0 = baseline; the same choice as the GEMM micro-kernel. */
inline int isaLevel() {
  static const int l = std::strcmp(kern().name, "avx512") == 0 ? 2 : std::strcmp(kern().name, "avx2") == 0 ? 1 : 0;
  return l;
}

/** Elements per job of the flat elementwise kernels (64 KiB of float32 per operand: stays in L2). */
constexpr long kChunk = 16384;

/** Runs fn over [0, n) in jobs of `chunk` (the last one shorter); small n runs inline without waking the pool. */
template <class A>
inline void forChunks(long n, long chunk, int threads, ChunkFn<A> fn, const A& a) {
  if (n <= 0) return;
  long jobs = (n + chunk - 1) / chunk;
  if (jobs == 1 || threads <= 1) {
    for (long j = 0; j < jobs; j++) fn(a, j * chunk, std::min(n, (j + 1) * chunk));
    return;
  }
  pool().run((int)jobs, threads, [&](int j, int) { fn(a, (long)j * chunk, std::min(n, ((long)j + 1) * chunk)); });
}

/** Rows per job so that a job covers about kChunk elements. */
inline long rowsPerJob(long cols) { return std::max(1L, kChunk / std::max(1L, cols)); }

// ---- fast exp --------------------------------------------------------------------------------------------------
// Cephes expf: n = round(x·log2 e), r = x − n·ln2 (two-part constant), degree-5 polynomial, times 2^n built in the
// exponent bits. Max error ≈ 2 ulp on [-87, 88]; the input is clamped there so 2^n stays a normal float (exp(−87)
// ≈ 1.6e-38, exp(88) ≈ 1.65e38), which is all silu needs: g/(1 + e^−g) → g for g > 87 and → ≈0 for g < −88.
// Round-to-nearest uses the 1.5·2^23 trick so that it vectorises without SSE4.1.

DQ_INLINE float expFast(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float fx = x * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;
  int32_t n = (int32_t)fx;
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  int32_t bits = (n + 127) << 23;
  float p;
  std::memcpy(&p, &bits, 4);
  return y * p;
}

// ---- swiglu --------------------------------------------------------------------------------------------------------

struct SwigluArgs { const float *dh, *g, *u; float *h, *dg, *du; };

/** h = silu(g) · u, silu(g) = g / (1 + e^−g). */
DQ_INLINE void swigluFwdK(const SwigluArgs& a, long i0, long i1) {
  const float* __restrict g = a.g; const float* __restrict u = a.u; float* __restrict h = a.h;
  for (long i = i0; i < i1; i++) {
    float gv = g[i];
    h[i] = gv / (1.0f + expFast(-gv)) * u[i];
  }
}
DQ_CLONES(swigluFwdK, SwigluArgs)

/** σ = 1/(1 + e^−g): dup = dh · (g·σ), dgate = dh · u · σ · (1 + g·(1 − σ)). */
DQ_INLINE void swigluBwdK(const SwigluArgs& a, long i0, long i1) {
  const float* __restrict dh = a.dh; const float* __restrict g = a.g; const float* __restrict u = a.u;
  float* __restrict dg = a.dg; float* __restrict du = a.du;
  for (long i = i0; i < i1; i++) {
    float gv = g[i], d = dh[i];
    float s = 1.0f / (1.0f + expFast(-gv));
    du[i] = d * (gv * s);
    dg[i] = d * u[i] * s * (1.0f + gv * (1.0f - s));
  }
}
DQ_CLONES(swigluBwdK, SwigluArgs)

inline void swigluForward(const float* g, const float* u, float* h, long n, int threads) {
  SwigluArgs a{nullptr, g, u, h, nullptr, nullptr};
  forChunks(n, kChunk, threads, swigluFwdKPick(), a);
}
inline void swigluBackward(const float* dh, const float* g, const float* u, float* dg, float* du, long n, int threads) {
  SwigluArgs a{dh, g, u, nullptr, dg, du};
  forChunks(n, kChunk, threads, swigluBwdKPick(), a);
}

// ---- axpy, scale ----------------------------------------------------------------------------------------------------

struct AxpyArgs { float* a; const float* b; float alpha; };

DQ_INLINE void axpyK(const AxpyArgs& s, long i0, long i1) {
  float* a = s.a; const float* b = s.b; const float al = s.alpha;  // no __restrict: b may be a (views of one storage)
  for (long i = i0; i < i1; i++) a[i] = a[i] + al * b[i];
}
DQ_CLONES(axpyK, AxpyArgs)

DQ_INLINE void scaleK(const AxpyArgs& s, long i0, long i1) {
  float* a = s.a; const float al = s.alpha;
  for (long i = i0; i < i1; i++) a[i] = a[i] * al;
}
DQ_CLONES(scaleK, AxpyArgs)

/** a += alpha · b, elementwise in index order inside a job (no __restrict: overlapping views are the caller's business). */
inline void axpy(float* a, const float* b, float alpha, long n, int threads) {
  forChunks(n, kChunk, threads, axpyKPick(), AxpyArgs{a, b, alpha});
}
inline void scale(float* a, float s, long n, int threads) {
  forChunks(n, kChunk, threads, scaleKPick(), AxpyArgs{a, nullptr, s});
}

// ---- float64 lane sums -----------------------------------------------------------------------------------------------

/** Σ x[i]·x[i] over [0, n) in float64, 8 interleaved lanes added in lane order. */
DQ_INLINE double sumSqLanes(const float* __restrict x, long n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  long i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) acc[k] += (double)x[i + k] * (double)x[i + k];
  for (int k = 0; i + k < n; k++) acc[k] += (double)x[i + k] * (double)x[i + k];
  double s = 0;
  for (int k = 0; k < 8; k++) s += acc[k];
  return s;
}

struct SumSqArgs { const float* x; double* partial; long chunk; };

DQ_INLINE void sumSqK(const SumSqArgs& a, long i0, long i1) { a.partial[i0 / a.chunk] = sumSqLanes(a.x + i0, i1 - i0); }
DQ_CLONES(sumSqK, SumSqArgs)

/** Σ x² in float64: per-chunk partials (fixed chunks of kChunk elements) added in chunk order. */
inline double sumSquares(const float* x, long n, int threads) {
  if (n <= 0) return 0.0;
  std::vector<double> partial((size_t)((n + kChunk - 1) / kChunk));
  forChunks(n, kChunk, threads, sumSqKPick(), SumSqArgs{x, partial.data(), kChunk});
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

// ---- sumRows --------------------------------------------------------------------------------------------------------

/** Columns per sumRows job. */
constexpr long kSumRowsCols = 256;

struct SumRowsArgs { const float* x; float* out; long N, C; };

/** Columns [j0, j1): out[j] = f32(Σ_n x[n, j]), float64 sums over rows in row order (the TS kernel's order). */
DQ_INLINE void sumRowsK(const SumRowsArgs& a, long j0, long j1) {
  double acc[kSumRowsCols];
  const long w = j1 - j0;
  for (long j = 0; j < w; j++) acc[j] = 0.0;
  for (long n = 0; n < a.N; n++) {
    const float* __restrict r = a.x + n * a.C + j0;
    for (long j = 0; j < w; j++) acc[j] += (double)r[j];
  }
  for (long j = 0; j < w; j++) a.out[j0 + j] = (float)acc[j];
}
DQ_CLONES(sumRowsK, SumRowsArgs)

inline void sumRows(const float* x, long N, long C, float* out, int threads) {
  forChunks(C, kSumRowsCols, threads, sumRowsKPick(), SumRowsArgs{x, out, N, C});
}

// ---- rmsnorm --------------------------------------------------------------------------------------------------------

struct RmsArgs { const float *x, *w, *dy, *rstdIn; float *y, *rstd, *dx; long H; double eps; };

/**
 * Rows [n0, n1). rstd = f32(1 / sqrt(f32(f32(Σx²/H) + eps))) with Σx² in float64 and eps a float64 (as the TS kernel
 * evaluates it); y = w · f32(x · rstd).
 */
DQ_INLINE void rmsFwdK(const RmsArgs& a, long n0, long n1) {
  const long H = a.H;
  const float* __restrict w = a.w;
  for (long n = n0; n < n1; n++) {
    const float* __restrict x = a.x + n * H;
    float* __restrict y = a.y + n * H;
    double ss = sumSqLanes(x, H);
    float ms = (float)(ss / (double)H);
    float r = (float)(1.0 / std::sqrt((double)(float)((double)ms + a.eps)));
    a.rstd[n] = r;
    for (long j = 0; j < H; j++) y[j] = w[j] * (x[j] * r);
  }
}
DQ_CLONES(rmsFwdK, RmsArgs)

/** Rows [n0, n1): dx = r · (g·w − x·c), c = r²·Σ(g·w·x)/H, all in float64 as the TS kernel (lane-ordered sum). */
DQ_INLINE void rmsBwdK(const RmsArgs& a, long n0, long n1) {
  const long H = a.H;
  const float* __restrict w = a.w;
  for (long n = n0; n < n1; n++) {
    const float* __restrict x = a.x + n * H;
    const float* __restrict g = a.dy + n * H;
    float* __restrict dx = a.dx + n * H;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long j = 0;
    for (; j + 8 <= H; j += 8)
      for (int k = 0; k < 8; k++) acc[k] += (double)g[j + k] * (double)w[j + k] * (double)x[j + k];
    for (int k = 0; j + k < H; k++) acc[k] += (double)g[j + k] * (double)w[j + k] * (double)x[j + k];
    double gx = 0;
    for (int k = 0; k < 8; k++) gx += acc[k];
    const double r = (double)a.rstdIn[n];
    const double c = r * r * gx / (double)H;
    for (long i = 0; i < H; i++) dx[i] = (float)(r * ((double)g[i] * (double)w[i] - (double)x[i] * c));
  }
}
DQ_CLONES(rmsBwdK, RmsArgs)

inline void rmsnormForward(const float* x, const float* w, long N, long H, double eps, float* y, float* rstd, int threads) {
  RmsArgs a{x, w, nullptr, nullptr, y, rstd, nullptr, H, eps};
  forChunks(N, rowsPerJob(H), threads, rmsFwdKPick(), a);
}
inline void rmsnormBackward(const float* dy, const float* x, const float* w, const float* rstd, long N, long H, float* dx, int threads) {
  RmsArgs a{x, w, dy, rstd, nullptr, nullptr, dx, H, 0.0};
  forChunks(N, rowsPerJob(H), threads, rmsBwdKPick(), a);
}

// ---- rope --------------------------------------------------------------------------------------------------------

struct RopeArgs {
  const float* x; float* y; const int32_t* pos;
  const float *cs, *sn;  // [table rows, half]
  long nh, D, half, rd;
  long base;             // table row of row n: pos[n] − base when byPos, else n
  bool byPos;
};

/** Rows [n0, n1): y[i] = x[i]·c − x[i+half]·s, y[i+half] = x[i+half]·c + x[i]·s; dims ≥ rd copied. */
DQ_INLINE void ropeK(const RopeArgs& a, long n0, long n1) {
  const long nh = a.nh, D = a.D, half = a.half, rd = a.rd;
  for (long n = n0; n < n1; n++) {
    const long t = a.byPos ? (long)a.pos[n] - a.base : n;
    const float* __restrict c = a.cs + t * half;
    const float* __restrict s = a.sn + t * half;
    for (long h = 0; h < nh; h++) {
      const float* __restrict x = a.x + (n * nh + h) * D;
      float* __restrict y = a.y + (n * nh + h) * D;
      for (long i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        y[i] = x1 * c[i] - x2 * s[i];
        y[i + half] = x2 * c[i] + x1 * s[i];
      }
      for (long i = rd; i < D; i++) y[i] = x[i];
    }
  }
}
DQ_CLONES(ropeK, RopeArgs)

/**
 * x [N, nh, D] → y. cos/sin are computed once per distinct position (a table over [min pos, max pos] when that range
 * is no longer than N, else one row per token): angle = f32(pos · invFreq[i]); c = f32(f32(cos) · ms);
 * s = sign · f32(f32(sin) · ms), with cos/sin in float64 — the TS kernel's values.
 */
inline void rope(const float* x, const int32_t* pos, const float* invFreq, long N, long nh, long D, long rd, float ms, bool inverse,
                 float* y, int threads) {
  if (N <= 0) return;
  const long half = rd / 2;
  long pmin = pos[0], pmax = pos[0];
  for (long n = 1; n < N; n++) { pmin = std::min(pmin, (long)pos[n]); pmax = std::max(pmax, (long)pos[n]); }
  const bool byPos = pmax - pmin + 1 <= N;
  const long rows = byPos ? pmax - pmin + 1 : N;
  std::vector<float> cs((size_t)(rows * half)), sn((size_t)(rows * half));
  const float sign = inverse ? -1.0f : 1.0f;
  for (long t = 0; t < rows; t++) {
    const double p = byPos ? (double)(pmin + t) : (double)pos[t];
    for (long i = 0; i < half; i++) {
      const float ang = (float)(p * (double)invFreq[i]);
      cs[t * half + i] = (float)std::cos((double)ang) * ms;
      sn[t * half + i] = sign * ((float)std::sin((double)ang) * ms);
    }
  }
  RopeArgs a{x, y, pos, cs.data(), sn.data(), nh, D, half, rd, pmin, byPos};
  forChunks(N, rowsPerJob(nh * D), threads, ropeKPick(), a);
}

// ---- adamw ----------------------------------------------------------------------------------------------------------

struct AdamArgs { float *p, *m, *v; const float* g; float decay, w1, b2, w2, bc2s, stepSize, eps; bool wd; };

/** torch.optim.AdamW single-tensor step, each op rounded to float32 in torch's order (see cpu.ts adamw). */
DQ_INLINE void adamK(const AdamArgs& a, long i0, long i1) {
  float* __restrict p = a.p; float* __restrict m = a.m; float* __restrict v = a.v; const float* __restrict g = a.g;
  const float decay = a.wd ? a.decay : 1.0f;  // p·1 is exact: the same bits as skipping the decay
  for (long i = i0; i < i1; i++) {
    float gi = g[i];
    float pi = p[i] * decay;
    float mi = m[i] + a.w1 * (gi - m[i]);
    float vi = v[i] * a.b2 + (a.w2 * gi) * gi;
    float denom = std::sqrt(vi) / a.bc2s + a.eps;
    m[i] = mi; v[i] = vi;
    p[i] = pi + (a.stepSize * mi) / denom;
  }
}
DQ_CLONES(adamK, AdamArgs)

inline void adamw(float* p, const float* g, float* m, float* v, long n, const AdamArgs& hyper, int threads) {
  AdamArgs a = hyper;
  a.p = p; a.g = g; a.m = m; a.v = v;
  forChunks(n, kChunk, threads, adamKPick(), a);
}

// ---- embedding ------------------------------------------------------------------------------------------------------

struct EmbArgs { const int32_t* ids; const float* table; float* out; long H; };

/** Rows [n0, n1): out[n] = table[ids[n]] (ids validated by the caller). */
inline void embK(const EmbArgs& a, long n0, long n1) {
  for (long n = n0; n < n1; n++) std::memcpy(a.out + n * a.H, a.table + (long)a.ids[n] * a.H, sizeof(float) * (size_t)a.H);
}

inline void embedding(const int32_t* ids, const float* table, long N, long H, float* out, int threads) {
  forChunks<EmbArgs>(N, rowsPerJob(H), threads, embK, EmbArgs{ids, table, out, H});
}

}  // namespace dq
