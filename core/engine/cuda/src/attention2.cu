// Causal GQA attention, second version: FlashAttention-2 on raw mma.sync.m16n8k16 (bf16 → f32) with the scores,
// probabilities and accumulators in registers. Same contract as attention.cu (which stays as the fallback,
// DQLORA_ATTN=v1): q [B, T, Hq, D], k/v [B, T, Hk, D] bf16, mask i32 [B, T], out bf16, lse f32 [B, Hq, T].
//
// Why it is faster than v1 (WMMA): no round trip of S / P / dP through shared memory, no per-tile f32 staging, the
// accumulator layout is known (so the softmax rescale is register-only), K/V (forward) and Q/dO (backward) tiles
// are double-buffered with cp.async so the copy of tile i+1 overlaps the math of tile i, and dQ goes out with
// vector (float2) atomics.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane/4, t = lane%4):
//   A 16×16: reg0 (row g, cols 2t..2t+1), reg1 (row g+8, same), reg2 (row g, cols 2t+8..), reg3 (row g+8, cols 2t+8..)
//   B 16×8 : reg0 (rows 2t..2t+1, col g), reg1 (rows 2t+8.., col g)
//   C 16×8 : c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, same cols)
// Two C tiles side by side (16×16) are exactly an A fragment, which is how P and dS feed the next product.
//
// Forward: block = 64 queries of one (b, h), 4 warps × 16 rows; loops over 64-key tiles up to the diagonal.
// Backward: block = 64 keys of one (b, kv head), 4 warps × 16 keys; loops over the GQA group's query heads and
// the query tiles at or after the key tile. Sᵀ, dPᵀ, Pᵀ, dSᵀ (keys × queries) stay in registers; dV += Pᵀ·dO and
// dK += dSᵀ·Q accumulate in registers; dSᵀ goes through shared memory once for dQ = dS·K (f32 atomics).
#include "ops.h"
#include "attn_mask.h"

#include <cuda_bf16.h>

namespace dq {
namespace {

typedef __nv_bfloat16 bf16;
constexpr int TILE = 64, NTHREADS = 128;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t sAddr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(sAddr(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(sAddr(p)));
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low 16 bits = the lower column
  return *reinterpret_cast<uint32_t*>(&v);
}
// 16-byte async copy global → shared; src_size 0 zero-fills (rows past T).
__device__ __forceinline__ void cpAsync16(bf16* dst, const bf16* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sAddr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cpCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cpWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Queues the copy of a 64-row tile (row stride `stride` elements in global) into smem rows of LD elements.
template <int D, int LD>
__device__ __forceinline__ void tileAsync(bf16* s, const bf16* g, size_t stride, int valid) {
  constexpr int V = D / 8;
  for (int i = threadIdx.x; i < TILE * V; i += NTHREADS) {
    int r = i / V, c = (i % V) * 8;
    bool ok = r < valid;
    cpAsync16(s + r * LD + c, g + (size_t)(ok ? r : 0) * stride + c, ok);
  }
}

// A fragment (16×16) of a row-major smem matrix at (row0, col0).
template <int LD>
__device__ __forceinline__ void loadA(uint32_t (&a)[4], const bf16* s, int row0, int col0, int lane) {
  int j = lane >> 3, r = lane & 7;
  ldsm4(a, s + (row0 + (j & 1) * 8 + r) * LD + col0 + (j >> 1) * 8);
}
// A fragment (16×16, A[m][k]) from a matrix stored transposed, S[k][m], at A-origin (m0, k0).
template <int LD>
__device__ __forceinline__ void loadAT(uint32_t (&a)[4], const bf16* s, int m0, int k0, int lane) {
  int j = lane >> 3, r = lane & 7;
  ldsm4t(a, s + (k0 + (j >> 1) * 8 + r) * LD + m0 + (j & 1) * 8);
}
// B fragments of two adjacent n-tiles (n0..n0+15) × k-chunk k0..k0+15 from storage Bs[n][k] (rows = n).
// b[0], b[1]: n-tile n0; b[2], b[3]: n-tile n0 + 8.
template <int LD>
__device__ __forceinline__ void loadBnk(uint32_t (&b)[4], const bf16* s, int n0, int k0, int lane) {
  int j = lane >> 3, r = lane & 7;
  ldsm4(b, s + (n0 + (j >> 1) * 8 + r) * LD + k0 + (j & 1) * 8);
}
// Same from storage Bs[k][n] (rows = k), through ldmatrix.trans.
template <int LD>
__device__ __forceinline__ void loadBkn(uint32_t (&b)[4], const bf16* s, int k0, int n0, int lane) {
  int j = lane >> 3, r = lane & 7;
  ldsm4t(b, s + (k0 + (j & 1) * 8 + r) * LD + n0 + (j >> 1) * 8);
}

template <int D>
struct Fwd2Smem {
  static constexpr int LD = D + 8;
  static constexpr size_t q = 0;
  static constexpr size_t k = q + TILE * LD * 2;          // [2][64][LD]
  static constexpr size_t v = k + 2 * TILE * LD * 2;      // [2][64][LD]
  static constexpr size_t mask = v + 2 * TILE * LD * 2;   // [2][64] i32
  static constexpr size_t total = mask + 2 * TILE * 4;
};

template <int D>
__global__ void __launch_bounds__(NTHREADS) attnFwd2K(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                      const bf16* __restrict__ v, const int32_t* __restrict__ keyMask,
                                                      bf16* __restrict__ out, float* __restrict__ lse, int T, int Hq,
                                                      int Hk, float scale) {
  using L = Fwd2Smem<D>;
  constexpr int LD = L::LD, NK = D / 16, ND = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sQ = (bf16*)(smem + L::q);
  bf16* sK = (bf16*)(smem + L::k);
  bf16* sV = (bf16*)(smem + L::v);
  int* sMask = (int*)(smem + L::mask);

  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest (most keys) tiles first
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hk);
  const int q0 = qt * TILE;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float sl2 = scale * LOG2E;
  const int nkt = (min(T, q0 + TILE) + TILE - 1) / TILE;
  const size_t kvStride = (size_t)Hk * D;

  auto prefetch = [&](int it) {
    const int k0 = it * TILE, buf = it & 1;
    const size_t off = ((size_t)b * T + k0) * kvStride + (size_t)hk * D;
    tileAsync<D, LD>(sK + buf * TILE * LD, k + off, kvStride, T - k0);
    tileAsync<D, LD>(sV + buf * TILE * LD, v + off, kvStride, T - k0);
    for (int i = threadIdx.x; i < TILE; i += NTHREADS) sMask[buf * TILE + i] = (k0 + i < T) ? keyMask[(size_t)b * T + k0 + i] : 0;
  };
  tileAsync<D, LD>(sQ, q + ((size_t)b * T + q0) * Hq * D + (size_t)h * D, (size_t)Hq * D, T - q0);
  prefetch(0);
  cpCommit();

  uint32_t qf[NK][4];
  float o[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float mRow[2] = {-INFINITY, -INFINITY}, lRow[2] = {0.f, 0.f};
  const int qi0 = q0 + warp * 16 + g, qi1 = qi0 + 8;
  // Segment labels of this lane's two query rows (sample packing: 0 = padding, else the example; see attnVisible).
  const int qs0 = qi0 < T ? keyMask[(size_t)b * T + qi0] : 0, qs1 = qi1 < T ? keyMask[(size_t)b * T + qi1] : 0;

  for (int it = 0; it < nkt; it++) {
    const int buf = it & 1, k0 = it * TILE;
    if (it + 1 < nkt) prefetch(it + 1);
    cpCommit();
    cpWait<1>();
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kc = 0; kc < NK; kc++) loadA<LD>(qf[kc], sQ, warp * 16, kc * 16, lane);
    }
    const bf16* cK = sK + buf * TILE * LD;
    const bf16* cV = sV + buf * TILE * LD;
    const int* cM = sMask + buf * TILE;

    // S [16 × 64] = Q · Kᵀ
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int np = 0; np < 4; np++) {
#pragma unroll
      for (int kc = 0; kc < NK; kc++) {
        uint32_t bb[4];
        loadBnk<LD>(bb, cK, np * 16, kc * 16, lane);
        mma(s[2 * np], qf[kc], bb[0], bb[1]);
        mma(s[2 * np + 1], qf[kc], bb[2], bb[3]);
      }
    }
    // Mask, scale to log2 units, online softmax (a row's 64 columns live in the 4 lanes of a quad).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int c = n * 8 + 2 * t + (e & 1), kj = k0 + c, qi = (e >> 1) ? qi1 : qi0;
        const float x = (kj <= qi && attnVisible(cM[c], (e >> 1) ? qs1 : qs0)) ? s[n][e] * sl2 : -INFINITY;
        s[n][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], mNew[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      mNew[r] = fmaxf(mRow[r], mx[r]);
      alpha[r] = mNew[r] == -INFINITY ? 1.f : exp2f(mRow[r] - mNew[r]);
      mRow[r] = mNew[r];
      lRow[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = e >> 1;
        const float p = mNew[r] == -INFINITY ? 0.f : exp2f(s[n][e] - mNew[r]);
        s[n][e] = p;
        lRow[r] += p;
      }
    }
#pragma unroll
    for (int n = 0; n < ND; n++) { o[n][0] *= alpha[0]; o[n][1] *= alpha[0]; o[n][2] *= alpha[1]; o[n][3] *= alpha[1]; }
    // O += P · V: P's C tiles (2kc, 2kc+1) are the A fragment of key chunk kc.
#pragma unroll
    for (int kc = 0; kc < 4; kc++) {
      uint32_t a[4] = {pack2(s[2 * kc][0], s[2 * kc][1]), pack2(s[2 * kc][2], s[2 * kc][3]),
                       pack2(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack2(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int np = 0; np < D / 16; np++) {
        uint32_t bb[4];
        loadBkn<LD>(bb, cV, kc * 16, np * 16, lane);
        mma(o[2 * np], a, bb[0], bb[1]);
        mma(o[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  cpWait<0>();

#pragma unroll
  for (int r = 0; r < 2; r++) {
    lRow[r] += __shfl_xor_sync(0xffffffffu, lRow[r], 1);
    lRow[r] += __shfl_xor_sync(0xffffffffu, lRow[r], 2);
  }
  const float inv0 = lRow[0] > 0.f ? 1.f / lRow[0] : 0.f, inv1 = lRow[1] > 0.f ? 1.f / lRow[1] : 0.f;
  bf16* o0 = out + (((size_t)b * T + qi0) * Hq + h) * D;
  bf16* o1 = out + (((size_t)b * T + qi1) * Hq + h) * D;
#pragma unroll
  for (int n = 0; n < ND; n++) {
    const int c = n * 8 + 2 * t;
    if (qi0 < T) *reinterpret_cast<__nv_bfloat162*>(o0 + c) = __floats2bfloat162_rn(o[n][0] * inv0, o[n][1] * inv0);
    if (qi1 < T) *reinterpret_cast<__nv_bfloat162*>(o1 + c) = __floats2bfloat162_rn(o[n][2] * inv1, o[n][3] * inv1);
  }
  if (t == 0) {
    if (qi0 < T) lse[(size_t)bh * T + qi0] = lRow[0] > 0.f ? mRow[0] * LN2 + logf(lRow[0]) : INFINITY;
    if (qi1 < T) lse[(size_t)bh * T + qi1] = lRow[1] > 0.f ? mRow[1] * LN2 + logf(lRow[1]) : INFINITY;
  }
}

template <int D>
struct Bwd2Smem {
  static constexpr int LD = D + 8, LDS = TILE + 8;
  static constexpr size_t k = 0;                            // [64][LD]
  static constexpr size_t v = k + TILE * LD * 2;            // [64][LD]
  static constexpr size_t q = v + TILE * LD * 2;            // [2][64][LD]
  static constexpr size_t dO = q + 2 * TILE * LD * 2;       // [2][64][LD]
  static constexpr size_t ds = dO + 2 * TILE * LD * 2;      // dSᵀ [64 keys][LDS] bf16
  static constexpr size_t lse = ds + TILE * LDS * 2;        // [2][64] f32 (already × log2 e)
  static constexpr size_t delta = lse + 2 * TILE * 4;       // [2][64] f32
  static constexpr size_t mask = delta + 2 * TILE * 4;      // [64] i32 (the keys' segment labels)
  static constexpr size_t qmask = mask + TILE * 4;          // [2][64] i32 (the queries' segment labels)
  static constexpr size_t total = qmask + 2 * TILE * 4;
};

__device__ __forceinline__ void atomicAdd2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

template <int D>
__global__ void __launch_bounds__(NTHREADS) attnBwd2K(const bf16* __restrict__ dout, const bf16* __restrict__ q,
                                                      const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                      const int32_t* __restrict__ keyMask,
                                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                                      float* __restrict__ dqAcc, bf16* __restrict__ dk,
                                                      bf16* __restrict__ dv, int T, int Hq, int Hk, float scale) {
  using L = Bwd2Smem<D>;
  constexpr int LD = L::LD, LDS = L::LDS, NK = D / 16, ND = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sK = (bf16*)(smem + L::k);
  bf16* sV = (bf16*)(smem + L::v);
  bf16* sQ = (bf16*)(smem + L::q);
  bf16* sdO = (bf16*)(smem + L::dO);
  bf16* sdS = (bf16*)(smem + L::ds);
  float* sLse = (float*)(smem + L::lse);
  float* sDelta = (float*)(smem + L::delta);
  int* sMask = (int*)(smem + L::mask);
  int* sQMask = (int*)(smem + L::qmask);

  const int kt = blockIdx.x, bhk = blockIdx.y, b = bhk / Hk, hk = bhk % Hk, G = Hq / Hk;
  const int k0 = kt * TILE;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float sl2 = scale * LOG2E;
  const size_t kvStride = (size_t)Hk * D, qStride = (size_t)Hq * D;
  const int nqt = (T - k0 + TILE - 1) / TILE;  // query tiles q0 = k0, k0 + 64, ... (TILE-aligned: causal)
  const int nIter = G * nqt;

  {
    const size_t off = ((size_t)b * T + k0) * kvStride + (size_t)hk * D;
    tileAsync<D, LD>(sK, k + off, kvStride, T - k0);
    tileAsync<D, LD>(sV, v + off, kvStride, T - k0);
    for (int i = threadIdx.x; i < TILE; i += NTHREADS) sMask[i] = (k0 + i < T) ? keyMask[(size_t)b * T + k0 + i] : 0;
  }
  auto prefetch = [&](int it) {
    const int h = hk * G + it / nqt, q0 = k0 + (it % nqt) * TILE, buf = it & 1;
    const size_t off = ((size_t)b * T + q0) * qStride + (size_t)h * D;
    tileAsync<D, LD>(sQ + buf * TILE * LD, q + off, qStride, T - q0);
    tileAsync<D, LD>(sdO + buf * TILE * LD, dout + off, qStride, T - q0);
    for (int i = threadIdx.x; i < TILE; i += NTHREADS) {
      const int qi = q0 + i;
      const size_t idx = ((size_t)b * Hq + h) * T + qi;
      sLse[buf * TILE + i] = qi < T ? lse[idx] * LOG2E : INFINITY;
      sDelta[buf * TILE + i] = qi < T ? delta[idx] : 0.f;
      sQMask[buf * TILE + i] = qi < T ? keyMask[(size_t)b * T + qi] : 0;
    }
  };
  prefetch(0);
  cpCommit();

  float dkA[ND][4], dvA[ND][4];
#pragma unroll
  for (int n = 0; n < ND; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) dkA[n][e] = dvA[n][e] = 0.f;
  const int kw = warp * 16;  // this warp's keys within the tile
  const int kj0 = k0 + kw + g, kj1 = kj0 + 8;

  for (int it = 0; it < nIter; it++) {
    const int buf = it & 1, h = hk * G + it / nqt, q0 = k0 + (it % nqt) * TILE;
    if (it + 1 < nIter) prefetch(it + 1);
    cpCommit();
    cpWait<1>();
    __syncthreads();
    const bf16* cQ = sQ + buf * TILE * LD;
    const bf16* cdO = sdO + buf * TILE * LD;
    const float* cLse = sLse + buf * TILE;
    const float* cDelta = sDelta + buf * TILE;
    const int* cQM = sQMask + buf * TILE;
    const int m0 = sMask[kw + g], m1 = sMask[kw + g + 8];

    // Sᵀ [16 keys × 64 queries] = K_w · Qᵀ ; dPᵀ = V_w · dOᵀ
    float st[8][4], dpt[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < NK; kc++) {
      uint32_t ak[4], av[4];
      loadA<LD>(ak, sK, kw, kc * 16, lane);
      loadA<LD>(av, sV, kw, kc * 16, lane);
#pragma unroll
      for (int np = 0; np < 4; np++) {
        uint32_t bq[4], bo[4];
        loadBnk<LD>(bq, cQ, np * 16, kc * 16, lane);
        loadBnk<LD>(bo, cdO, np * 16, kc * 16, lane);
        mma(st[2 * np], ak, bq[0], bq[1]);
        mma(st[2 * np + 1], ak, bq[2], bq[3]);
        mma(dpt[2 * np], av, bo[0], bo[1]);
        mma(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }
    // Pᵀ = exp(S·scale − lse) where key ≤ query and the key is real; dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale.
#pragma unroll
    for (int n = 0; n < 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int c = n * 8 + 2 * t + (e & 1), qi = q0 + c;
        const int kj = (e >> 1) ? kj1 : kj0;
        const bool ok = attnVisible((e >> 1) ? m1 : m0, cQM[c]) && kj <= qi && qi < T;
        const float p = ok ? exp2f(st[n][e] * sl2 - cLse[c]) : 0.f;
        st[n][e] = p;
        dpt[n][e] = p * (dpt[n][e] - cDelta[c]) * scale;
      }
    }
    // dV += Pᵀ · dO ; dK += dSᵀ · Q   (k-dim = the 64 queries, 4 chunks)
#pragma unroll
    for (int qc = 0; qc < 4; qc++) {
      uint32_t ap[4] = {pack2(st[2 * qc][0], st[2 * qc][1]), pack2(st[2 * qc][2], st[2 * qc][3]),
                        pack2(st[2 * qc + 1][0], st[2 * qc + 1][1]), pack2(st[2 * qc + 1][2], st[2 * qc + 1][3])};
      uint32_t ad[4] = {pack2(dpt[2 * qc][0], dpt[2 * qc][1]), pack2(dpt[2 * qc][2], dpt[2 * qc][3]),
                        pack2(dpt[2 * qc + 1][0], dpt[2 * qc + 1][1]), pack2(dpt[2 * qc + 1][2], dpt[2 * qc + 1][3])};
      // dSᵀ to shared memory for dQ (the same bf16 values the dK product uses).
      __nv_bfloat162* row0 = reinterpret_cast<__nv_bfloat162*>(sdS + (kw + g) * LDS + qc * 16 + 2 * t);
      __nv_bfloat162* row1 = reinterpret_cast<__nv_bfloat162*>(sdS + (kw + g + 8) * LDS + qc * 16 + 2 * t);
      row0[0] = *reinterpret_cast<__nv_bfloat162*>(&ad[0]);
      row1[0] = *reinterpret_cast<__nv_bfloat162*>(&ad[1]);
      row0[4] = *reinterpret_cast<__nv_bfloat162*>(&ad[2]);  // +8 columns
      row1[4] = *reinterpret_cast<__nv_bfloat162*>(&ad[3]);
#pragma unroll
      for (int np = 0; np < D / 16; np++) {
        uint32_t bo[4], bq[4];
        loadBkn<LD>(bo, cdO, qc * 16, np * 16, lane);
        loadBkn<LD>(bq, cQ, qc * 16, np * 16, lane);
        mma(dvA[2 * np], ap, bo[0], bo[1]);
        mma(dvA[2 * np + 1], ap, bo[2], bo[3]);
        mma(dkA[2 * np], ad, bq[0], bq[1]);
        mma(dkA[2 * np + 1], ad, bq[2], bq[3]);
      }
    }
    __syncthreads();  // dSᵀ of all 64 keys is in shared memory

    // dQ [16 queries of this warp × D] = dS · K  (dS[q][key] read transposed from dSᵀ; K rows = keys)
    {
      const int qw = warp * 16;
      float dqa[ND][4];
#pragma unroll
      for (int n = 0; n < ND; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < 4; kc++) {
        uint32_t a[4];
        loadAT<LDS>(a, sdS, qw, kc * 16, lane);
#pragma unroll
        for (int np = 0; np < D / 16; np++) {
          uint32_t bk[4];
          loadBkn<LD>(bk, sK, kc * 16, np * 16, lane);
          mma(dqa[2 * np], a, bk[0], bk[1]);
          mma(dqa[2 * np + 1], a, bk[2], bk[3]);
        }
      }
      const int qa = q0 + qw + g, qb = qa + 8;
      float* d0 = dqAcc + (((size_t)b * T + qa) * Hq + h) * D;
      float* d1 = dqAcc + (((size_t)b * T + qb) * Hq + h) * D;
#pragma unroll
      for (int n = 0; n < ND; n++) {
        const int c = n * 8 + 2 * t;
        if (qa < T) atomicAdd2(d0 + c, dqa[n][0], dqa[n][1]);
        if (qb < T) atomicAdd2(d1 + c, dqa[n][2], dqa[n][3]);
      }
    }
    __syncthreads();  // sQ/sdO[buf] and dSᵀ are free for the next prefetch / iteration
  }
  cpWait<0>();

  bf16* v0 = dv + (((size_t)b * T + kj0) * Hk + hk) * D;
  bf16* v1 = dv + (((size_t)b * T + kj1) * Hk + hk) * D;
  bf16* c0 = dk + (((size_t)b * T + kj0) * Hk + hk) * D;
  bf16* c1 = dk + (((size_t)b * T + kj1) * Hk + hk) * D;
#pragma unroll
  for (int n = 0; n < ND; n++) {
    const int c = n * 8 + 2 * t;
    if (kj0 < T) {
      *reinterpret_cast<__nv_bfloat162*>(v0 + c) = __floats2bfloat162_rn(dvA[n][0], dvA[n][1]);
      *reinterpret_cast<__nv_bfloat162*>(c0 + c) = __floats2bfloat162_rn(dkA[n][0], dkA[n][1]);
    }
    if (kj1 < T) {
      *reinterpret_cast<__nv_bfloat162*>(v1 + c) = __floats2bfloat162_rn(dvA[n][2], dvA[n][3]);
      *reinterpret_cast<__nv_bfloat162*>(c1 + c) = __floats2bfloat162_rn(dkA[n][2], dkA[n][3]);
    }
  }
}

template <class K>
void smemAttr(K kernel, size_t bytes) {
  int dev = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if ((size_t)optin < bytes)
    fail("attention (v2) needs " + std::to_string(bytes) + " B of shared memory per block, this GPU allows " +
             std::to_string(optin), __FILE__, __LINE__);
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

template <int D>
void fwd2(const void* q, const void* k, const void* v, const int32_t* mask, void* out, float* lse, int B, int T, int Hq,
          int Hk, float scale) {
  const size_t sm = Fwd2Smem<D>::total;
  smemAttr(attnFwd2K<D>, sm);
  dim3 grid((T + TILE - 1) / TILE, B * Hq);
  attnFwd2K<D><<<grid, NTHREADS, sm, stream()>>>((const bf16*)q, (const bf16*)k, (const bf16*)v, mask, (bf16*)out,
                                                 lse, T, Hq, Hk, scale);
  KERNEL_CHECK();
}

template <int D>
void bwd2(const void* dout, const void* q, const void* k, const void* v, const int32_t* mask, const float* lse,
          const float* delta, float* dqAcc, void* dk, void* dv, int B, int T, int Hq, int Hk, float scale) {
  const size_t sm = Bwd2Smem<D>::total;
  smemAttr(attnBwd2K<D>, sm);
  dim3 grid((T + TILE - 1) / TILE, B * Hk);
  attnBwd2K<D><<<grid, NTHREADS, sm, stream()>>>((const bf16*)dout, (const bf16*)q, (const bf16*)k, (const bf16*)v,
                                                 mask, lse, delta, dqAcc, (bf16*)dk, (bf16*)dv, T, Hq, Hk, scale);
  KERNEL_CHECK();
}

}  // namespace

void attentionForwardV2(const void* q, const void* k, const void* v, const int32_t* mask, void* out, float* lse, int B,
                        int T, int Hq, int Hk, int D, float scale) {
  switch (D) {
    case 16: fwd2<16>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
    case 32: fwd2<32>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
    case 64: fwd2<64>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
    default: fwd2<128>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
  }
}

void attentionBackwardV2(const void* dout, const void* q, const void* k, const void* v, const int32_t* mask,
                         const float* lse, const float* delta, float* dqAcc, void* dk, void* dv, int B, int T, int Hq,
                         int Hk, int D, float scale) {
  switch (D) {
    case 16: bwd2<16>(dout, q, k, v, mask, lse, delta, dqAcc, dk, dv, B, T, Hq, Hk, scale); break;
    case 32: bwd2<32>(dout, q, k, v, mask, lse, delta, dqAcc, dk, dv, B, T, Hq, Hk, scale); break;
    case 64: bwd2<64>(dout, q, k, v, mask, lse, delta, dqAcc, dk, dv, B, T, Hq, Hk, scale); break;
    default: bwd2<128>(dout, q, k, v, mask, lse, delta, dqAcc, dk, dv, B, T, Hq, Hk, scale); break;
  }
}

}  // namespace dq
