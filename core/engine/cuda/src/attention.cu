// Causal GQA attention, flash-style (FlashAttention-2 schedule) on bf16 tensor cores through WMMA.
//
// Forward: one block per (64-query tile, batch·head). Key/value tiles of 64 stream through shared memory; the
// scores S = Q·Kᵀ of a tile, the online softmax (running max m and sum l per row) and O += P·V never leave
// the SM; only O (bf16) and the row log-sum-exp (f32) are written. No T×T matrix exists anywhere.
// Backward: one block per (64-key tile, batch·kv-head); it loops over the query heads of its GQA group and
// the query tiles at or after the key tile, recomputes P = exp(S·scale − lse) per tile, accumulates dK and dV
// in shared memory (no atomics: the block owns its keys) and adds dQ into an f32 buffer with atomics.
//
// Layouts: q [B, T, Hq, D], k/v [B, T, Hk, D] bf16; mask i32 [B, T] (1 = real key); lse f32 [B, Hq, T].
// A query attends to keys j ≤ i with mask[j] ≠ 0 and, for a real query, mask[j] = mask[i] (attnVisible: sample
// packing labels each packed example's tokens 1, 2, …; unpacked batches are all 1); a row with none gets O = 0 and
// lse = +inf (so its P is 0).
#include "ops.h"
#include "attn_mask.h"

#include <mma.h>

#include <cstdlib>
#include <cstring>

namespace dq {
namespace {

using namespace nvcuda;
constexpr int BQ = 64, BK = 64, WARPS = 4, THREADS = WARPS * 32;

typedef __nv_bfloat16 bf16;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> FragAT;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBT;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Loads `rows` rows of D bf16 (global row stride `stride` elements) into smem rows of ld elements,
// zero-filling rows past `valid`. 16-byte vector copies (D % 8 == 0 and 16-byte aligned rows, checked on host).
template <int D>
__device__ __forceinline__ void loadTile(bf16* s, int ld, const bf16* g, size_t stride, int rows, int valid) {
  constexpr int V = D / 8;
  for (int i = threadIdx.x; i < rows * V; i += THREADS) {
    int r = i / V, c = (i % V) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < valid) val = *reinterpret_cast<const uint4*>(g + r * stride + c);
    *reinterpret_cast<uint4*>(s + r * ld + c) = val;
  }
}

template <int D>
struct FwdSmem {
  static constexpr int LDH = D + 8, LDS = BK + 4, LDP = BK + 8, LDO = D + 4;
  static constexpr size_t q = 0;
  static constexpr size_t k = align128(q + BQ * LDH * 2);
  static constexpr size_t v = align128(k + BK * LDH * 2);
  static constexpr size_t s = align128(v + BK * LDH * 2);
  static constexpr size_t p = align128(s + BQ * LDS * 4);
  static constexpr size_t m = align128(p + BQ * LDP * 2);
  static constexpr size_t l = m + BQ * 4;
  static constexpr size_t alpha = l + BQ * 4;
  static constexpr size_t mask = alpha + BQ * 4;
  static constexpr size_t total = align128(mask + BK * 4);
};

template <int D>
__global__ void __launch_bounds__(THREADS) attnFwdK(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                    const bf16* __restrict__ v, const int32_t* __restrict__ keyMask,
                                                    bf16* __restrict__ out, float* __restrict__ lse, int T, int Hq,
                                                    int Hk, float scale) {
  using L = FwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sQ = (bf16*)(smem + L::q);
  bf16* sK = (bf16*)(smem + L::k);
  bf16* sV = (bf16*)(smem + L::v);
  float* sS = (float*)(smem + L::s);
  bf16* sP = (bf16*)(smem + L::p);
  float* sM = (float*)(smem + L::m);
  float* sL = (float*)(smem + L::l);
  float* sAlpha = (float*)(smem + L::alpha);
  int* sMask = (int*)(smem + L::mask);

  const int nqt = gridDim.x;
  const int qt = nqt - 1 - blockIdx.x;  // longest (most keys) tiles first
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hk);
  const int q0 = qt * BQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  loadTile<D>(sQ, L::LDH, q + ((size_t)b * T + q0) * Hq * D + (size_t)h * D, (size_t)Hq * D, BQ, T - q0);
  for (int i = threadIdx.x; i < BQ; i += THREADS) { sM[i] = -INFINITY; sL[i] = 0.f; }

  // O stays in registers (accumulator fragments) for the whole key loop. Rescaling a row needs to know which
  // row each fragment element holds; the layout is opaque, so learn it through the API once: load a 16×16
  // matrix whose entries are their own row numbers.
  float* scratch = sS + warp * 16 * L::LDS;  // this warp's rows of S
  for (int i = lane; i < 256; i += 32) scratch[(i / 16) * L::LDS + i % 16] = (float)(i / 16);
  __syncwarp();
  FragC rowOf;
  wmma::load_matrix_sync(rowOf, scratch, L::LDS, wmma::mem_row_major);
  FragC oAcc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; n++) wmma::fill_fragment(oAcc[n], 0.f);

  const int kEnd = min(T, q0 + BQ);
  for (int k0 = 0; k0 < kEnd; k0 += BK) {
    __syncthreads();  // previous tile's K/V/P fully consumed
    const size_t kvOff = ((size_t)b * T + k0) * Hk * D + (size_t)hk * D;
    loadTile<D>(sK, L::LDH, k + kvOff, (size_t)Hk * D, BK, T - k0);
    loadTile<D>(sV, L::LDH, v + kvOff, (size_t)Hk * D, BK, T - k0);
    for (int i = threadIdx.x; i < BK; i += THREADS) sMask[i] = (k0 + i < T) ? keyMask[(size_t)b * T + k0 + i] : 0;
    __syncthreads();

    // S[16 rows of this warp, 64 keys] = Q · Kᵀ
    for (int n = 0; n < BK / 16; n++) {
      FragC c;
      wmma::fill_fragment(c, 0.f);
      for (int kk = 0; kk < D / 16; kk++) {
        FragA a;
        FragBT bt;
        wmma::load_matrix_sync(a, sQ + warp * 16 * L::LDH + kk * 16, L::LDH);
        wmma::load_matrix_sync(bt, sK + n * 16 * L::LDH + kk * 16, L::LDH);
        wmma::mma_sync(c, a, bt, c);
      }
      wmma::store_matrix_sync(sS + warp * 16 * L::LDS + n * 16, c, L::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: two lanes per row, 32 columns each.
    {
      // Two lanes per row, interleaved columns (c = lane&1, +2, ...): adjacent banks for the pair.
      const int r = warp * 16 + (lane >> 1), c0 = lane & 1;
      const int qi = q0 + r;
      const int qs = qi < T ? keyMask[(size_t)b * T + qi] : 0;
      float mx = -INFINITY;
      for (int c = c0; c < BK; c += 2) {
        int kj = k0 + c;
        if (kj <= qi && attnVisible(sMask[c], qs)) mx = fmaxf(mx, sS[r * L::LDS + c] * scale);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float mOld = sM[r];
      const float mNew = fmaxf(mOld, mx);
      float sum = 0.f;
      for (int c = c0; c < BK; c += 2) {
        int kj = k0 + c;
        float p = 0.f;
        if (mNew != -INFINITY && kj <= qi && attnVisible(sMask[c], qs)) p = __expf(sS[r * L::LDS + c] * scale - mNew);
        sum += p;
        sP[r * L::LDP + c] = __float2bfloat16_rn(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      __syncwarp();
      if ((lane & 1) == 0) {
        float alpha = mNew == -INFINITY ? 1.f : __expf(mOld - mNew);
        sAlpha[r] = alpha;
        sL[r] = sL[r] * alpha + sum;
        sM[r] = mNew;
      }
    }
    __syncwarp();
    // O[16 rows, D] = O · diag(alpha) + P · V
#pragma unroll
    for (int n = 0; n < D / 16; n++) {
#pragma unroll
      for (int i = 0; i < oAcc[n].num_elements; i++) oAcc[n].x[i] *= sAlpha[warp * 16 + (int)rowOf.x[i]];
#pragma unroll
      for (int kk = 0; kk < BK / 16; kk++) {
        FragA a;
        FragB bb;
        wmma::load_matrix_sync(a, sP + warp * 16 * L::LDP + kk * 16, L::LDP);
        wmma::load_matrix_sync(bb, sV + kk * 16 * L::LDH + n * 16, L::LDH);
        wmma::mma_sync(oAcc[n], a, bb, oAcc[n]);
      }
    }
  }
  __syncwarp();

  // O / l → bf16, through this warp's S rows, 4 fragments (64 columns) at a time.
#pragma unroll
  for (int n0 = 0; n0 < D / 16; n0 += 4) {
#pragma unroll
    for (int n = n0; n < n0 + 4 && n < D / 16; n++) {
      FragC c = oAcc[n];
#pragma unroll
      for (int i = 0; i < c.num_elements; i++) {
        float l = sL[warp * 16 + (int)rowOf.x[i]];
        c.x[i] = l > 0.f ? c.x[i] / l : 0.f;
      }
      wmma::store_matrix_sync(scratch + (n - n0) * 16, c, L::LDS, wmma::mem_row_major);
    }
    __syncwarp();
    constexpr int cols = (D / 16 < 4 ? D / 16 : 4) * 16;
    for (int i = lane; i < 16 * cols; i += 32) {
      int r = i / cols, d = i % cols, qi = q0 + warp * 16 + r;
      if (qi < T) out[(((size_t)b * T + qi) * Hq + h) * D + n0 * 16 + d] = __float2bfloat16_rn(scratch[r * L::LDS + d]);
    }
    __syncwarp();
  }
  if (lane < 16) {
    int r = warp * 16 + lane, qi = q0 + r;
    if (qi < T) {
      float l = sL[r];
      lse[(size_t)bh * T + qi] = l > 0.f ? sM[r] + logf(l) : INFINITY;
    }
  }
}

// delta[b, h, t] = Σ_d dO·O  (f32), one warp per row.
__global__ void attnDeltaK(const bf16* __restrict__ dout, const bf16* __restrict__ out, float* delta, int B, int T,
                           int Hq, int D) {
  size_t rows = (size_t)B * T * Hq;
  size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
  int lane = threadIdx.x & 31;
  if (warp >= rows) return;
  // warp indexes [B, T, Hq] rows of dout/out; delta is [B, Hq, T].
  size_t b = warp / ((size_t)T * Hq), t = (warp / Hq) % T, h = warp % Hq;
  const bf16* po = out + warp * D;
  const bf16* pd = dout + warp * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += __bfloat162float(po[d]) * __bfloat162float(pd[d]);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) delta[(b * Hq + h) * T + t] = acc;
}

template <int D>
struct BwdSmem {
  static constexpr int LDH = D + 8, LDS = BK + 4, LDP = BK + 8, LDO = D + 4;
  static constexpr size_t k = 0;
  static constexpr size_t v = align128(k + BK * LDH * 2);
  static constexpr size_t q = align128(v + BK * LDH * 2);
  static constexpr size_t dO = align128(q + BQ * LDH * 2);
  static constexpr size_t s = align128(dO + BQ * LDH * 2);  // S, then (with dp) reused as the dQ tile
  static constexpr size_t dp = align128(s + BQ * LDS * 4);
  static constexpr size_t p = align128(dp + BQ * LDS * 4);
  static constexpr size_t ds = align128(p + BQ * LDP * 2);
  static constexpr size_t lse = align128(ds + BQ * LDP * 2);
  static constexpr size_t delta = lse + BQ * 4;
  static constexpr size_t mask = delta + BQ * 4;
  static constexpr size_t total = align128(mask + BK * 4);
  static_assert(dp + BQ * LDS * 4 - s >= (size_t)BQ * LDO * 4, "dQ tile must fit in the S + dP buffers");
};

template <int D>
__global__ void __launch_bounds__(THREADS) attnBwdK(const bf16* __restrict__ dout, const bf16* __restrict__ q,
                                                    const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                    const int32_t* __restrict__ keyMask,
                                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                                    float* __restrict__ dqAcc, bf16* __restrict__ dk,
                                                    bf16* __restrict__ dv, int T, int Hq, int Hk, float scale) {
  using L = BwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sK = (bf16*)(smem + L::k);
  bf16* sV = (bf16*)(smem + L::v);
  bf16* sQ = (bf16*)(smem + L::q);
  bf16* sdO = (bf16*)(smem + L::dO);
  float* sS = (float*)(smem + L::s);
  float* sdP = (float*)(smem + L::dp);
  float* sdQ = (float*)(smem + L::s);
  bf16* sP = (bf16*)(smem + L::p);
  bf16* sdS = (bf16*)(smem + L::ds);
  float* sLse = (float*)(smem + L::lse);
  float* sDelta = (float*)(smem + L::delta);
  int* sMask = (int*)(smem + L::mask);

  const int kt = blockIdx.x, bhk = blockIdx.y, b = bhk / Hk, hk = bhk % Hk, G = Hq / Hk;
  const int k0 = kt * BK;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  const size_t kvOff = ((size_t)b * T + k0) * Hk * D + (size_t)hk * D;
  loadTile<D>(sK, L::LDH, k + kvOff, (size_t)Hk * D, BK, T - k0);
  loadTile<D>(sV, L::LDH, v + kvOff, (size_t)Hk * D, BK, T - k0);
  for (int i = threadIdx.x; i < BK; i += THREADS) sMask[i] = (k0 + i < T) ? keyMask[(size_t)b * T + k0 + i] : 0;
  // dK, dV of this warp's 16 keys live in registers for the whole loop (no per-row scaling is needed).
  FragC dkAcc[D / 16], dvAcc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; n++) { wmma::fill_fragment(dkAcc[n], 0.f); wmma::fill_fragment(dvAcc[n], 0.f); }

  for (int h = hk * G; h < hk * G + G; h++) {
    for (int q0 = (k0 / BQ) * BQ; q0 < T; q0 += BQ) {
      __syncthreads();  // previous iteration fully consumed sQ/sdO/sP/sdS/sdQ
      const size_t qOff = ((size_t)b * T + q0) * Hq * D + (size_t)h * D;
      loadTile<D>(sQ, L::LDH, q + qOff, (size_t)Hq * D, BQ, T - q0);
      loadTile<D>(sdO, L::LDH, dout + qOff, (size_t)Hq * D, BQ, T - q0);
      for (int i = threadIdx.x; i < BQ; i += THREADS) {
        int qi = q0 + i;
        size_t idx = ((size_t)b * Hq + h) * T + qi;
        sLse[i] = qi < T ? lse[idx] : INFINITY;
        sDelta[i] = qi < T ? delta[idx] : 0.f;
      }
      __syncthreads();

      // S = Q·Kᵀ and dP = dO·Vᵀ for this warp's 16 query rows.
      for (int n = 0; n < BK / 16; n++) {
        FragC c, cp;
        wmma::fill_fragment(c, 0.f);
        wmma::fill_fragment(cp, 0.f);
        for (int kk = 0; kk < D / 16; kk++) {
          FragA a, ad;
          FragBT bk, bv;
          wmma::load_matrix_sync(a, sQ + warp * 16 * L::LDH + kk * 16, L::LDH);
          wmma::load_matrix_sync(bk, sK + n * 16 * L::LDH + kk * 16, L::LDH);
          wmma::mma_sync(c, a, bk, c);
          wmma::load_matrix_sync(ad, sdO + warp * 16 * L::LDH + kk * 16, L::LDH);
          wmma::load_matrix_sync(bv, sV + n * 16 * L::LDH + kk * 16, L::LDH);
          wmma::mma_sync(cp, ad, bv, cp);
        }
        wmma::store_matrix_sync(sS + warp * 16 * L::LDS + n * 16, c, L::LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(sdP + warp * 16 * L::LDS + n * 16, cp, L::LDS, wmma::mem_row_major);
      }
      __syncwarp();
      // P = exp(S·scale − lse) (0 where masked), dS = P ∘ (dP − delta) · scale.
      for (int i = lane; i < 16 * BK; i += 32) {
        int r = warp * 16 + i / BK, c = i % BK;
        int qi = q0 + r, kj = k0 + c;
        float p = 0.f;
        if (kj <= qi && qi < T && attnVisible(sMask[c], keyMask[(size_t)b * T + qi])) p = __expf(sS[r * L::LDS + c] * scale - sLse[r]);
        float ds = p * (sdP[r * L::LDS + c] - sDelta[r]) * scale;
        sP[r * L::LDP + c] = __float2bfloat16_rn(p);
        sdS[r * L::LDP + c] = __float2bfloat16_rn(ds);
      }
      __syncthreads();

      // dV[16 key rows of this warp] += Pᵀ·dO ; dK += dSᵀ·Q
#pragma unroll
      for (int kk = 0; kk < BQ / 16; kk++) {
        FragAT pt, dst;
        wmma::load_matrix_sync(pt, sP + kk * 16 * L::LDP + warp * 16, L::LDP);
        wmma::load_matrix_sync(dst, sdS + kk * 16 * L::LDP + warp * 16, L::LDP);
#pragma unroll
        for (int n = 0; n < D / 16; n++) {
          FragB bo, bq;
          wmma::load_matrix_sync(bo, sdO + kk * 16 * L::LDH + n * 16, L::LDH);
          wmma::mma_sync(dvAcc[n], pt, bo, dvAcc[n]);
          wmma::load_matrix_sync(bq, sQ + kk * 16 * L::LDH + n * 16, L::LDH);
          wmma::mma_sync(dkAcc[n], dst, bq, dkAcc[n]);
        }
      }
      // dQ[16 query rows of this warp] = dS·K, added to the f32 accumulator. sdQ aliases S/dP, which every
      // warp finished reading before the barrier above.
      for (int n = 0; n < D / 16; n++) {
        FragC c;
        wmma::fill_fragment(c, 0.f);
        for (int kk = 0; kk < BK / 16; kk++) {
          FragA a;
          FragB bk;
          wmma::load_matrix_sync(a, sdS + warp * 16 * L::LDP + kk * 16, L::LDP);
          wmma::load_matrix_sync(bk, sK + kk * 16 * L::LDH + n * 16, L::LDH);
          wmma::mma_sync(c, a, bk, c);
        }
        wmma::store_matrix_sync(sdQ + warp * 16 * L::LDO + n * 16, c, L::LDO, wmma::mem_row_major);
      }
      __syncwarp();
      for (int i = lane; i < 16 * D; i += 32) {
        int r = warp * 16 + i / D, d = i % D, qi = q0 + r;
        if (qi < T) atomicAdd(dqAcc + (((size_t)b * T + qi) * Hq + h) * D + d, sdQ[r * L::LDO + d]);
      }
    }
  }
  __syncthreads();
  // Out through this warp's rows of the dQ tile buffer: dV first, then dK.
  float* tile = sdQ + warp * 16 * L::LDO;
#pragma unroll
  for (int which = 0; which < 2; which++) {
#pragma unroll
    for (int n = 0; n < D / 16; n++)
      wmma::store_matrix_sync(tile + n * 16, which == 0 ? dvAcc[n] : dkAcc[n], L::LDO, wmma::mem_row_major);
    __syncwarp();
    bf16* dst = which == 0 ? dv : dk;
    for (int i = lane; i < 16 * D; i += 32) {
      int r = i / D, d = i % D, kj = k0 + warp * 16 + r;
      if (kj < T) dst[(((size_t)b * T + kj) * Hk + hk) * D + d] = __float2bfloat16_rn(tile[r * L::LDO + d]);
    }
    __syncwarp();
  }
}

void checkCommon(const void* q, const void* k, const void* v, int B, int T, int Hq, int Hk, int D) {
  REQUIRE(B > 0 && T > 0 && Hq > 0 && Hk > 0, "attention: empty shape");
  REQUIRE(Hq % Hk == 0, "attention: Hq must be a multiple of Hk");
  REQUIRE(D == 16 || D == 32 || D == 64 || D == 128, "attention: head dim must be 16, 32, 64 or 128");
  REQUIRE(((uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 16 == 0, "attention: q/k/v must be 16-byte aligned");
}

template <class K>
void setSmem(K kernel, size_t bytes) {
  int dev = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if ((size_t)optin < bytes)
    fail("attention needs " + std::to_string(bytes) + " B of shared memory per block, this GPU allows " +
             std::to_string(optin), __FILE__, __LINE__);
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

template <int D>
void fwd(const void* q, const void* k, const void* v, const int32_t* mask, void* out, float* lse, int B, int T, int Hq,
         int Hk, float scale) {
  size_t sm = FwdSmem<D>::total;
  setSmem(attnFwdK<D>, sm);
  dim3 grid((T + BQ - 1) / BQ, B * Hq);
  attnFwdK<D><<<grid, THREADS, sm, stream()>>>((const bf16*)q, (const bf16*)k, (const bf16*)v, mask, (bf16*)out, lse, T,
                                               Hq, Hk, scale);
  KERNEL_CHECK();
}

template <int D>
void bwd(const void* dout, const void* q, const void* k, const void* v, const int32_t* mask, const float* lse,
         const float* delta, float* dqAcc, void* dk, void* dv, int B, int T, int Hq, int Hk, float scale) {
  size_t sm = BwdSmem<D>::total;
  setSmem(attnBwdK<D>, sm);
  dim3 grid((T + BK - 1) / BK, B * Hk);
  attnBwdK<D><<<grid, THREADS, sm, stream()>>>((const bf16*)dout, (const bf16*)q, (const bf16*)k, (const bf16*)v, mask,
                                               lse, delta, dqAcc, (bf16*)dk, (bf16*)dv, T, Hq, Hk, scale);
  KERNEL_CHECK();
}

}  // namespace

// attention2.cu: the mma.sync / register-resident version (default); DQLORA_ATTN=v1 selects the WMMA kernels above
// (read at every call, so a benchmark can compare both in one process).
void attentionForwardV2(const void* q, const void* k, const void* v, const int32_t* mask, void* out, float* lse, int B,
                        int T, int Hq, int Hk, int D, float scale);
void attentionBackwardV2(const void* dout, const void* q, const void* k, const void* v, const int32_t* mask,
                         const float* lse, const float* delta, float* dqAcc, void* dk, void* dv, int B, int T, int Hq,
                         int Hk, int D, float scale);
static bool useV1() {
  const char* e = std::getenv("DQLORA_ATTN");
  return e && std::strcmp(e, "v1") == 0;
}

void attentionForward(const void* q, const void* k, const void* v, const int32_t* mask, void* out, float* lse, int B,
                      int T, int Hq, int Hk, int D, float scale) {
  checkCommon(q, k, v, B, T, Hq, Hk, D);
  if (!useV1()) return attentionForwardV2(q, k, v, mask, out, lse, B, T, Hq, Hk, D, scale);
  switch (D) {
    case 16: fwd<16>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
    case 32: fwd<32>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
    case 64: fwd<64>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
    default: fwd<128>(q, k, v, mask, out, lse, B, T, Hq, Hk, scale); break;
  }
}

void attentionBackward(const void* dout, const void* q, const void* k, const void* v, const int32_t* mask,
                       const void* out, const float* lse, void* dq, void* dk, void* dv, int B, int T, int Hq, int Hk,
                       int D, float scale) {
  checkCommon(q, k, v, B, T, Hq, Hk, D);
  REQUIRE(((uintptr_t)dout) % 16 == 0, "attention: dout must be 16-byte aligned");
  size_t nq = (size_t)B * T * Hq * D;
  Scratch delta((size_t)B * Hq * T * sizeof(float));
  Scratch dqAcc(nq * sizeof(float));
  CUDA_CHECK(cudaMemsetAsync(dqAcc.p, 0, nq * sizeof(float), stream()));
  size_t rows = (size_t)B * T * Hq;
  attnDeltaK<<<blocksFor(rows * 32, 256, 1u << 30), 256, 0, stream()>>>((const bf16*)dout, (const bf16*)out,
                                                                        delta.as<float>(), B, T, Hq, D);
  KERNEL_CHECK();
  if (!useV1()) {
    attentionBackwardV2(dout, q, k, v, mask, lse, delta.as<float>(), dqAcc.as<float>(), dk, dv, B, T, Hq, Hk, D, scale);
    convert(dqAcc.p, F32, dq, BF16, nq);
    return;
  }
  switch (D) {
    case 16: bwd<16>(dout, q, k, v, mask, lse, delta.as<float>(), dqAcc.as<float>(), dk, dv, B, T, Hq, Hk, scale); break;
    case 32: bwd<32>(dout, q, k, v, mask, lse, delta.as<float>(), dqAcc.as<float>(), dk, dv, B, T, Hq, Hk, scale); break;
    case 64: bwd<64>(dout, q, k, v, mask, lse, delta.as<float>(), dqAcc.as<float>(), dk, dv, B, T, Hq, Hk, scale); break;
    default: bwd<128>(dout, q, k, v, mask, lse, delta.as<float>(), dqAcc.as<float>(), dk, dv, B, T, Hq, Hk, scale); break;
  }
  convert(dqAcc.p, F32, dq, BF16, nq);
}

}  // namespace dq
