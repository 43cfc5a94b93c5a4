// Attention, cross-entropy, dropout and a peak-FLOP probe, built on gemm.h and pool.h. Semantics are those of
// core/engine/backend.ts (see the TypeScript twins in core/engine/cpu/*.ts, which the tests compare).
#pragma once
#include <cmath>
#include <cstdint>
#include <chrono>
#include <limits>
#include "gemm.h"

namespace dq {

// ---- vectorised exp over a row ------------------------------------------------------------------------------------
// Cephes-style expf (max error ~2 ulp): n = round(x·log2 e), r = x − n·ln2 (two-part), degree-5 polynomial,
// scale by 2^n. Used for the softmax sums where glibc's scalar expf would dominate (a [rows, 32000] vocabulary).

/** out[i] = exp(x[i] − m); returns Σ out[i] (float64 sum of float32 lane sums, fixed order). */
static double expRowScalar(const float* x, float m, float* out, int n) {
  double s = 0;
  for (int i = 0; i < n; i++) { float e = std::exp(x[i] - m); out[i] = e; s += e; }
  return s;
}

#ifdef DQ_X86
__attribute__((target("avx512f"))) static double expRowAvx512(const float* x, float m, float* out, int n) {
  const __m512 vm = _mm512_set1_ps(m), lo = _mm512_set1_ps(-88.0f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  const __m512 p0 = _mm512_set1_ps(1.9875691500e-4f), p1 = _mm512_set1_ps(1.3981999507e-3f), p2 = _mm512_set1_ps(8.3334519073e-3f);
  const __m512 p3 = _mm512_set1_ps(4.1665795894e-2f), p4 = _mm512_set1_ps(1.6666665459e-1f), p5 = _mm512_set1_ps(5.0000001201e-1f);
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm);
    __mmask16 under = _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ);
    v = _mm512_max_ps(v, lo);
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, c1, v);
    r = _mm512_fnmadd_ps(fx, c2, r);
    __m512 y = _mm512_fmadd_ps(p0, r, p1);
    y = _mm512_fmadd_ps(y, r, p2); y = _mm512_fmadd_ps(y, r, p3); y = _mm512_fmadd_ps(y, r, p4); y = _mm512_fmadd_ps(y, r, p5);
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, one));
    y = _mm512_scalef_ps(y, fx);
    y = _mm512_maskz_mov_ps(k & ~under, y);
    _mm512_mask_storeu_ps(out + i, k, y);
    acc = _mm512_add_ps(acc, y);
  }
  alignas(64) float l[16];
  _mm512_store_ps(l, acc);
  double s = 0;
  for (int i = 0; i < 16; i++) s += l[i];
  return s;
}
#endif

inline double expRow(const float* x, float m, float* out, int n) {
#ifdef DQ_X86
  if (std::strcmp(kern().name, "avx512") == 0) return expRowAvx512(x, m, out, n);
#endif
  return expRowScalar(x, m, out, n);
}

// ---- attention ------------------------------------------------------------------------------------------------------

struct AttnDims { int B, T, Hq, Hk, D; };

/** Query rows per causal block. */
constexpr int kAttnRows = 64;

// ---- masked row max ----------------------------------------------------------------------------------------------------
// row[s] = −inf where key s is not visible (so exp gives exactly 0), and the max of the row over [0, n). Max is exact,
// so the vector and scalar versions return the same value. The scalar loop's maxss chain was ≈30% of the attention
// forward. Mask values: 0 = padding, else the segment (packed example) of the token; a query with segment `seg` sees
// keys of the same segment only (block-diagonal causal mask of sample packing); a padding query (seg 0) sees every
// real key. Unpacked batches mark every real token 1.

static float maskRowMaxScalar(float* row, const int32_t* mask, int n, int32_t seg) {
  float m = -std::numeric_limits<float>::infinity();
  for (int s = 0; s < n; s++) {
    if (!mask[s] || (seg != 0 && mask[s] != seg)) row[s] = -std::numeric_limits<float>::infinity();
    else if (row[s] > m) m = row[s];
  }
  return m;
}

#ifdef DQ_X86
__attribute__((target("avx512f"))) static float maskRowMaxAvx512(float* row, const int32_t* mask, int n, int32_t seg) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i vseg = _mm512_set1_epi32(seg);
  __m512 vm = ninf;
  for (int i = 0; i < n; i += 16) {
    __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    __m512i mv = _mm512_maskz_loadu_epi32(k, mask + i);
    __mmask16 valid = _mm512_mask_cmpneq_epi32_mask(k, mv, _mm512_setzero_si512());
    if (seg != 0) valid = _mm512_mask_cmpeq_epi32_mask(valid, mv, vseg);
    __m512 v = _mm512_mask_blend_ps(valid, ninf, _mm512_maskz_loadu_ps(k, row + i));
    _mm512_mask_storeu_ps(row + i, k, v);
    vm = _mm512_max_ps(vm, v);
  }
  return _mm512_reduce_max_ps(vm);
}
#endif

inline float maskRowMax(float* row, const int32_t* mask, int n, int32_t seg) {
#ifdef DQ_X86
  if (std::strcmp(kern().name, "avx512") == 0) return maskRowMaxAvx512(row, mask, n, seg);
#endif
  return maskRowMaxScalar(row, mask, n, seg);
}

/** Masked softmax of query row t in place; returns lse (−inf and a zero row when no key is valid). */
inline float softmaxRow(float* row, const int32_t* mask, int t, int T, float* tmp) {
  float m = maskRowMax(row, mask, t + 1, mask[t]);
  if (m == -std::numeric_limits<float>::infinity()) {
    for (int s = 0; s < T; s++) row[s] = 0.0f;
    return m;
  }
  double sum = expRow(row, m, tmp, t + 1);
  float inv = (float)(1.0 / sum);
  for (int s = 0; s <= t; s++) row[s] = tmp[s] * inv;
  for (int s = t + 1; s < T; s++) row[s] = 0.0f;
  return m + (float)std::log(sum);
}

/**
 * First key index a query block [t0, t1) can see: keys before it are invisible to every query of the block (each
 * real query sees only keys of its own segment, whose first index is first[t]; a padding query sees every real key,
 * so it pins 0). Packed rows thus skip the keys of earlier examples; unpacked rows skip leading padding only.
 * `first` holds, per position, the first index of its mask value (computed once per row by firstOfLabel).
 */
inline int blockKeyStart(const int32_t* mb, const int* first, int t0, int t1) {
  int lo = t0;
  for (int t = t0; t < t1 && lo > 0; t++) lo = mb[t] == 0 ? 0 : std::min(lo, first[t]);
  return lo;
}

/** first[t] = the first s with mb[s] == mb[t] (labels are small: a map would be overkill, scan back per new label). */
inline void firstOfLabel(const int32_t* mb, int T, int* first) {
  for (int t = 0; t < T; t++) {
    if (t > 0 && mb[t] == mb[t - 1]) { first[t] = first[t - 1]; continue; }
    int f = t;
    for (int s = 0; s < t; s++) if (mb[s] == mb[t]) { f = s; break; }
    first[t] = f;
  }
}

inline void attentionForward(const float* q, const float* k, const float* v, const int32_t* mask, AttnDims d, float scale,
                             float* out, float* lse, int threads) {
  const int g = d.Hq / d.Hk;
  pool().run(d.B * d.Hq, threads, [&](int job, int tid) {
    int b = job / d.Hq, h = job % d.Hq, kh = h / g;
    Scratch& sc = scratch()[tid];
    float* S = sc.s.get((size_t)d.T * d.T);
    float* tmp = sc.t.get((size_t)d.T + 16);
    const long qs = (long)d.Hq * d.D, ks = (long)d.Hk * d.D;
    const float* qb = q + ((long)b * d.T * d.Hq + h) * d.D;
    const float* kb = k + ((long)b * d.T * d.Hk + kh) * d.D;
    const float* vb = v + ((long)b * d.T * d.Hk + kh) * d.D;
    BSrc kt; kt.b = kb; kt.rs = 1; kt.cs = ks;  // B'(dim, s) = K[s, dim]
    BSrc vv; vv.b = vb; vv.rs = ks; vv.cs = 1;
    const int32_t* mb = mask + (long)b * d.T;
    int* first = (int*)sc.u.get((size_t)d.T);
    firstOfLabel(mb, d.T, first);
    // Causal: query rows [t0, t1) only need keys [k0, t1), so scores and P·V run on row blocks (≈40% less work at
    // T=256); k0 > 0 skips keys no query of the block sees (earlier examples of a packed row). Scores left of k0 are
    // stale scratch: softmaxRow masks them (they are invisible) before reading.
    for (int t0 = 0; t0 < d.T; t0 += kAttnRows) {
      int t1 = std::min(d.T, t0 + kAttnRows);
      int k0 = blockKeyStart(mb, first, t0, t1);
      BSrc ktk = kt; ktk.b = kb + (long)k0 * ks;
      BSrc vvk = vv; vvk.b = vb + (long)k0 * ks;
      gemmSerial(t1 - t0, t1 - k0, d.D, scale, ASrc{qb + t0 * qs, qs, 1}, ktk, 0.0f, S + (long)t0 * d.T + k0, d.T, sc);
      for (int t = t0; t < t1; t++) lse[((long)b * d.Hq + h) * d.T + t] = softmaxRow(S + (long)t * d.T, mb, t, t1, tmp);
      gemmSerial(t1 - t0, d.D, t1 - k0, 1.0f, ASrc{S + (long)t0 * d.T + k0, d.T, 1}, vvk, 0.0f, out + ((long)b * d.T * d.Hq + h) * d.D + t0 * qs, qs, sc);
    }
  });
}

/** One job per (b, kv head): dk/dv of a kv head are summed over its query heads in one thread, in head order. */
inline void attentionBackward(const float* dout, const float* q, const float* k, const float* v, const int32_t* mask,
                              const float* out, const float* lse, AttnDims d, float scale, float* dq, float* dk, float* dv, int threads) {
  const int g = d.Hq / d.Hk;
  pool().run(d.B * d.Hk, threads, [&](int job, int tid) {
    int b = job / d.Hk, kh = job % d.Hk;
    Scratch& sc = scratch()[tid];
    const long T = d.T, qs = (long)d.Hq * d.D, ks = (long)d.Hk * d.D;
    float* P = sc.s.get((size_t)T * T);
    float* dP = sc.t.get((size_t)T * T);
    float* Di = sc.u.get((size_t)kAttnRows);
    const float* kb = k + ((long)b * T * d.Hk + kh) * d.D;
    const float* vb = v + ((long)b * T * d.Hk + kh) * d.D;
    float* dkb = dk + ((long)b * T * d.Hk + kh) * d.D;
    float* dvb = dv + ((long)b * T * d.Hk + kh) * d.D;
    const int32_t* mb = mask + (long)b * T;
    int* first = (int*)sc.w.get((size_t)T);
    firstOfLabel(mb, (int)T, first);
    for (long t = 0; t < T; t++)
      for (int e = 0; e < d.D; e++) { dkb[t * ks + e] = 0.0f; dvb[t * ks + e] = 0.0f; }
    BSrc kt; kt.b = kb; kt.rs = 1; kt.cs = ks;  // B'(dim, s) = K[s, dim]
    BSrc vt; vt.b = vb; vt.rs = 1; vt.cs = ks;  // B'(dim, s) = V[s, dim]
    BSrc kk; kk.b = kb; kk.rs = ks; kk.cs = 1;  // B'(s, dim) = K[s, dim]
    for (int h = kh * g; h < (kh + 1) * g; h++) {
      const long qo = ((long)b * T * d.Hq + h) * d.D;
      const float* qb = q + qo; const float* gb = dout + qo; const float* ob = out + qo;
      const float* L = lse + ((long)b * d.Hq + h) * T;
      // Causal row blocks as in the forward: rows [t0, t1) touch keys [0, t1) only. dK/dV sum over (head, block)
      // in a fixed order inside this one job.
      for (long t0 = 0; t0 < T; t0 += kAttnRows) {
        const long t1 = std::min(T, t0 + (long)kAttnRows), rb = t1 - t0;
        // Keys [k0, t1) only (see attentionForward); columns left of k0 are masked before use and skipped after.
        const long k0 = blockKeyStart(mb, first, (int)t0, (int)t1), nk = t1 - k0;
        BSrc ktk = kt; ktk.b = kb + k0 * ks;
        BSrc vtk = vt; vtk.b = vb + k0 * ks;
        BSrc kkk = kk; kkk.b = kb + k0 * ks;
        gemmSerial(rb, nk, d.D, scale, ASrc{qb + t0 * qs, qs, 1}, ktk, 0.0f, P + k0, t1, sc);  // scores [rb, k0:t1]
        for (long t = t0; t < t1; t++) {
          float* row = P + (t - t0) * t1;
          if (L[t] == -std::numeric_limits<float>::infinity()) { for (long s = 0; s < t1; s++) row[s] = 0.0f; Di[t - t0] = 0.0f; continue; }
          maskRowMax(row, mb, (int)t + 1, mb[t]);  // only for the masking (exp of −inf is exactly 0)
          expRow(row, L[t], row, (int)t + 1);
          for (long s = t + 1; s < t1; s++) row[s] = 0.0f;
          double di = 0;
          for (int e = 0; e < d.D; e++) di += (double)gb[t * qs + e] * ob[t * qs + e];
          Di[t - t0] = (float)di;
        }
        BSrc go; go.b = gb + t0 * qs; go.rs = qs; go.cs = 1;  // B'(t, dim) = dO[t0 + t, dim]
        gemmSerial(nk, d.D, rb, 1.0f, ASrc{P + k0, 1, t1}, go, 1.0f, dvb + k0 * ks, ks, sc);  // dV[k0:t1] += Pᵀ dO
        gemmSerial(rb, nk, d.D, 1.0f, ASrc{gb + t0 * qs, qs, 1}, vtk, 0.0f, dP + k0, t1, sc);  // dP = dO Vᵀ
        for (long t = 0; t < rb; t++)
          for (long s = k0; s < t1; s++) dP[t * t1 + s] = P[t * t1 + s] * (dP[t * t1 + s] - Di[t]);  // dS
        gemmSerial(rb, d.D, nk, scale, ASrc{dP + k0, t1, 1}, kkk, 0.0f, dq + qo + t0 * qs, qs, sc);  // dQ = scale dS K
        BSrc qq; qq.b = qb + t0 * qs; qq.rs = qs; qq.cs = 1;
        gemmSerial(nk, d.D, rb, scale, ASrc{dP + k0, 1, t1}, qq, 1.0f, dkb + k0 * ks, ks, sc);  // dK[k0:t1] += scale dSᵀ Q
      }
    }
  });
}

// ---- cross-entropy ---------------------------------------------------------------------------------------------------

inline void crossEntropy(const float* x, const int32_t* tg, int N, int V, float* rowLoss, float* dl, float gs, int threads) {
  const int rowsPerJob = 4;
  pool().run((N + rowsPerJob - 1) / rowsPerJob, threads, [&](int job, int tid) {
    Scratch& sc = scratch()[tid];
    float* tmp = sc.s.get((size_t)V + 16);
    for (int n = job * rowsPerJob; n < std::min(N, (job + 1) * rowsPerJob); n++) {
      const float* xr = x + (long)n * V;
      float* dr = dl ? dl + (long)n * V : nullptr;
      int t = tg[n];
      if (t == -100) {
        rowLoss[n] = 0.0f;
        if (dr) std::memset(dr, 0, sizeof(float) * V);
        continue;
      }
      float m = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < V; j++) m = xr[j] > m ? xr[j] : m;
      float xt = xr[t];
      float* e = dr ? dr : tmp;  // exp values land directly in dlogits (may alias logits: xr is not read again)
      double s = expRow(xr, m, e, V);
      rowLoss[n] = (float)(std::log(s) + (double)m - (double)xt);
      if (dr) {
        float f = (float)(gs / s);
        for (int j = 0; j < V; j++) dr[j] *= f;
        dr[t] -= gs;
      }
    }
  });
}

// ---- dropout (Philox4x32-10, word 0; see cpu.ts for the mask definition) ----------------------------------------------

inline uint32_t philoxWord0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return c0;
}

/**
 * One row: y[j] = keep(j) ? x[j]·scale : 0 for j in [j0, C). keep ⇔ u = (word0 >> 8)·2⁻²⁴ ≥ p, which for the
 * integer (word0 >> 8) is exactly (word0 >> 8) ≥ thr with thr = ⌈p·2²⁴⌉ (p·2²⁴ is exact in float64).
 */
static void dropoutRowScalar(const float* x, float* y, int j0, int C, uint32_t thr, float scale, uint32_t c1, uint32_t c2,
                             uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int j = j0; j < C; j++) y[j] = (philoxWord0((uint32_t)j, c1, c2, c3, k0, k1) >> 8) >= thr ? x[j] * scale : 0.0f;
}

#ifdef DQ_X86
// Philox4x32-10 on 16 (8) counters c0 = j..j+15 at once: 32×32 → 64-bit products as mullo (low words) and two
// mul_epu32 on the even / odd lanes (high words). The same integers as philoxWord0, so the same mask bits.
__attribute__((target("avx512f"))) static inline __m512i mulhiEpu32x16(__m512i a, __m512i b) {
  __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, b), 32);
  __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  return _mm512_mask_blend_epi32((__mmask16)0xAAAA, even, odd);
}

__attribute__((target("avx512f"))) static void dropoutRowAvx512(const float* x, float* y, int C, uint32_t thr, float scale,
                                                               uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const __m512i M0 = _mm512_set1_epi32((int)0xD2511F53u), M1 = _mm512_set1_epi32((int)0xCD9E8D57u);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vthr = _mm512_set1_epi32((int)thr);
  const __m512 vs = _mm512_set1_ps(scale);
  for (int j = 0; j < C; j += 16) {
    const __mmask16 m = C - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - j)) - 1);
    __m512i a0 = _mm512_add_epi32(_mm512_set1_epi32(j), lane), a1 = _mm512_set1_epi32((int)c1);
    __m512i a2 = _mm512_set1_epi32((int)c2), a3 = _mm512_set1_epi32((int)c3);
    uint32_t q0 = k0, q1 = k1;
    for (int r = 0; r < 10; r++) {
      __m512i lo0 = _mm512_mullo_epi32(a0, M0), hi0 = mulhiEpu32x16(a0, M0);
      __m512i lo1 = _mm512_mullo_epi32(a2, M1), hi1 = mulhiEpu32x16(a2, M1);
      a0 = _mm512_xor_si512(_mm512_xor_si512(hi1, a1), _mm512_set1_epi32((int)q0));
      a1 = lo1;
      a2 = _mm512_xor_si512(_mm512_xor_si512(hi0, a3), _mm512_set1_epi32((int)q1));
      a3 = lo0;
      q0 += 0x9E3779B9u; q1 += 0xBB67AE85u;
    }
    __mmask16 keep = _mm512_mask_cmpge_epu32_mask(m, _mm512_srli_epi32(a0, 8), vthr);
    _mm512_mask_storeu_ps(y + j, m, _mm512_maskz_mul_ps(keep, _mm512_maskz_loadu_ps(m, x + j), vs));
  }
}

__attribute__((target("avx2"))) static inline __m256i mulhiEpu32x8(__m256i a, __m256i b) {
  __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, b), 32);
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  return _mm256_blend_epi32(even, odd, 0xAA);
}

__attribute__((target("avx2"))) static void dropoutRowAvx2(const float* x, float* y, int C, uint32_t thr, float scale,
                                                          uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const __m256i M0 = _mm256_set1_epi32((int)0xD2511F53u), M1 = _mm256_set1_epi32((int)0xCD9E8D57u);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vthr = _mm256_set1_epi32((int)thr);  // ≤ 2²⁴, and (word0 >> 8) < 2²⁴: a signed compare is exact
  const __m256 vs = _mm256_set1_ps(scale);
  int j = 0;
  for (; j + 8 <= C; j += 8) {
    __m256i a0 = _mm256_add_epi32(_mm256_set1_epi32(j), lane), a1 = _mm256_set1_epi32((int)c1);
    __m256i a2 = _mm256_set1_epi32((int)c2), a3 = _mm256_set1_epi32((int)c3);
    uint32_t q0 = k0, q1 = k1;
    for (int r = 0; r < 10; r++) {
      __m256i lo0 = _mm256_mullo_epi32(a0, M0), hi0 = mulhiEpu32x8(a0, M0);
      __m256i lo1 = _mm256_mullo_epi32(a2, M1), hi1 = mulhiEpu32x8(a2, M1);
      a0 = _mm256_xor_si256(_mm256_xor_si256(hi1, a1), _mm256_set1_epi32((int)q0));
      a1 = lo1;
      a2 = _mm256_xor_si256(_mm256_xor_si256(hi0, a3), _mm256_set1_epi32((int)q1));
      a3 = lo0;
      q0 += 0x9E3779B9u; q1 += 0xBB67AE85u;
    }
    __m256i drop = _mm256_cmpgt_epi32(vthr, _mm256_srli_epi32(a0, 8));
    __m256 yv = _mm256_mul_ps(_mm256_loadu_ps(x + j), vs);
    _mm256_storeu_ps(y + j, _mm256_andnot_ps(_mm256_castsi256_ps(drop), yv));
  }
  dropoutRowScalar(x, y, j, C, thr, scale, c1, c2, c3, k0, k1);
}
#endif

inline void dropout(const float* x, float* y, int N, int C, double p, float scale, uint32_t k0, uint32_t k1, uint32_t stream,
                    const int32_t* rowSample, const int32_t* rowPos, int threads) {
  const uint32_t thr = (uint32_t)std::ceil(p * 16777216.0);
  auto row = [&](const float* xr, float* yr, uint32_t c1, uint32_t c2) {
#ifdef DQ_X86
    if (std::strcmp(kern().name, "avx512") == 0) return dropoutRowAvx512(xr, yr, C, thr, scale, c1, c2, stream, k0, k1);
    if (std::strcmp(kern().name, "avx2") == 0) return dropoutRowAvx2(xr, yr, C, thr, scale, c1, c2, stream, k0, k1);
#endif
    dropoutRowScalar(xr, yr, 0, C, thr, scale, c1, c2, stream, k0, k1);
  };
  pool().run((N + 7) / 8, threads, [&](int job, int) {
    for (int n = job * 8; n < std::min(N, job * 8 + 8); n++)
      row(x + (long)n * C, y + (long)n * C, (uint32_t)rowPos[n], (uint32_t)rowSample[n]);
  });
}

// ---- peak probe --------------------------------------------------------------------------------------------------------

#ifdef DQ_X86
__attribute__((target("avx512f"))) static long fmaLoopAvx512(long iters, float* sink) {
  __m512 a[12];
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps(1.0f + i * 1e-7f);
  const __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], m, c);
  }
  __m512 s = a[0];
  for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
  *sink = _mm512_reduce_add_ps(s);
  return iters * 12 * 16 * 2;
}
__attribute__((target("avx2,fma"))) static long fmaLoopAvx2(long iters, float* sink) {
  __m256 a[10];
  for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps(1.0f + i * 1e-7f);
  const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 10
    for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], m, c);
  }
  float l[8]; __m256 s = a[0];
  for (int i = 1; i < 10; i++) s = _mm256_add_ps(s, a[i]);
  _mm256_storeu_ps(l, s);
  *sink = l[0];
  return iters * 10 * 8 * 2;
}
#endif

inline double peakGflops(double ms, int threads) {
  std::atomic<long> flops{0};
  auto t0 = std::chrono::steady_clock::now();
  pool().run(threads, threads, [&](int, int) {
    float sink = 0; long f = 0;
    auto start = std::chrono::steady_clock::now();
    while (std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() < ms) {
#ifdef DQ_X86
      if (std::strcmp(kern().name, "avx512") == 0) f += fmaLoopAvx512(1 << 16, &sink);
      else if (std::strcmp(kern().name, "avx2") == 0) f += fmaLoopAvx2(1 << 16, &sink);
      else
#endif
      { volatile float a = 1.0f; for (int i = 0; i < (1 << 16); i++) a = a * 0.9999999f + 1e-7f; f += 2L << 16; sink = a; }
    }
    flops += f + (sink == 12345.0f ? 1 : 0);
  });
  double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return (double)flops.load() / sec / 1e9;
}

}  // namespace dq
