// Cache-blocked, register-tiled SGEMM (the BLIS loop structure) with an NF4-dequantizing B-packer.
//
//   C[M, N] = alpha · A'[M, K] · B'[K, N] + beta · C        A'(i, k) = a[i·rs + k·cs], B' likewise or NF4.
//
// Work is split into jobs = (row group × column panel) tiles of C; each job runs in one thread and sums every
// one of its elements over k in the same fixed order (KC blocks ascending, k ascending inside a block, one
// accumulator per element), so results are bit-identical for any thread count. Micro-kernels: AVX-512
// (12×32), AVX2+FMA (6×16), portable scalar (4×4), chosen once at load with __builtin_cpu_supports; each is
// compiled with its own target attribute so the binary runs on any x86-64 (and the scalar one anywhere).
// Partial edge tiles use masked loads/stores with the same arithmetic as full tiles.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include "pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DQ_X86 1
#endif

namespace dq {

// ---- scratch -------------------------------------------------------------------------------------------------

struct Buf {
  float* p = nullptr;
  size_t n = 0;
  float* get(size_t m) {
    if (m > n) {
      std::free(p);
      size_t bytes = ((m * sizeof(float) + 63) / 64) * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      n = m;
    }
    return p;
  }
};

/** Per-thread scratch: a/b/d for GEMM packing (d: NF4 rows before transposing), s/t/u for callers (attention). */
struct Scratch { Buf a, b, d, s, t, u, w; };
inline Scratch* scratch() { static Scratch* s = new Scratch[kMaxThreads]; return s; }

// ---- operand sources ------------------------------------------------------------------------------------------

struct ASrc { const float* a; long rs, cs; };

/** B'(k, j): dense a[k·rs + j·cs], or NF4 element f = k·fk + j·fj of a packed [out, in] weight. */
struct BSrc {
  const float* b = nullptr; long rs = 0, cs = 0;
  const uint8_t* packed = nullptr; const float* absmax = nullptr; const float* table = nullptr;
  long fk = 0, fj = 0; int bs = 64, bshift = 6;  // bshift < 0: blocksize not a power of two
};

inline float nf4At(const BSrc& s, long f) {
  uint8_t byte = s.packed[f >> 1];
  int code = (f & 1) ? (byte & 15) : (byte >> 4);
  long blk = s.bshift >= 0 ? (f >> s.bshift) : (f / s.bs);
  return s.table[code] * s.absmax[blk];
}

// ---- micro-kernels ----------------------------------------------------------------------------------------------

typedef void (*Ukr)(int kc, const float* A, const float* B, float* C, long ldc, int mr, int nr, float alpha, float beta);

struct Kern { int MR, NR; Ukr ukr; const char* name; };

static void ukrScalar(int kc, const float* A, const float* B, float* C, long ldc, int mr, int nr, float alpha, float beta) {
  float acc[4][4] = {{0}};
  for (int k = 0; k < kc; k++, A += 4, B += 4)
    for (int r = 0; r < 4; r++)
      for (int c = 0; c < 4; c++) acc[r][c] += A[r] * B[c];
  for (int r = 0; r < mr; r++)
    for (int c = 0; c < nr; c++) {
      float* p = C + r * ldc + c;
      *p = beta == 0.0f ? alpha * acc[r][c] : alpha * acc[r][c] + beta * *p;
    }
}

#ifdef DQ_X86
__attribute__((target("avx2,fma"))) static void ukrAvx2(int kc, const float* A, const float* B, float* C, long ldc, int mr, int nr,
                                                       float alpha, float beta) {
  __m256 c0[6], c1[6];
#pragma GCC unroll 6
  for (int r = 0; r < 6; r++) { c0[r] = _mm256_setzero_ps(); c1[r] = _mm256_setzero_ps(); }
  for (int k = 0; k < kc; k++, A += 6, B += 16) {
    __m256 b0 = _mm256_load_ps(B), b1 = _mm256_load_ps(B + 8);
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
      __m256 a = _mm256_broadcast_ss(A + r);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  alignas(32) int32_t m[16];
  for (int c = 0; c < 16; c++) m[c] = c < nr ? -1 : 0;
  __m256i m0 = _mm256_load_si256((const __m256i*)m), m1 = _mm256_load_si256((const __m256i*)(m + 8));
  bool full = nr == 16;
  for (int r = 0; r < mr; r++) {
    float* p = C + r * ldc;
    __m256 o0 = full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m0);
    __m256 o1 = full ? _mm256_loadu_ps(p + 8) : _mm256_maskload_ps(p + 8, m1);
    __m256 r0 = beta == 0.0f ? _mm256_mul_ps(va, c0[r]) : _mm256_fmadd_ps(va, c0[r], _mm256_mul_ps(vb, o0));
    __m256 r1 = beta == 0.0f ? _mm256_mul_ps(va, c1[r]) : _mm256_fmadd_ps(va, c1[r], _mm256_mul_ps(vb, o1));
    if (full) { _mm256_storeu_ps(p, r0); _mm256_storeu_ps(p + 8, r1); }
    else { _mm256_maskstore_ps(p, m0, r0); _mm256_maskstore_ps(p + 8, m1, r1); }
  }
}

__attribute__((target("avx512f"))) static void ukrAvx512(int kc, const float* A, const float* B, float* C, long ldc, int mr, int nr,
                                                        float alpha, float beta) {
  __m512 c0[12], c1[12];
#pragma GCC unroll 12
  for (int r = 0; r < 12; r++) { c0[r] = _mm512_setzero_ps(); c1[r] = _mm512_setzero_ps(); }
  for (int k = 0; k < kc; k++, A += 12, B += 32) {
    __m512 b0 = _mm512_load_ps(B), b1 = _mm512_load_ps(B + 16);
#pragma GCC unroll 12
    for (int r = 0; r < 12; r++) {
      __m512 a = _mm512_set1_ps(A[r]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  __mmask16 k0 = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
  __mmask16 k1 = nr >= 32 ? (__mmask16)0xFFFF : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1) : (__mmask16)0;
  for (int r = 0; r < mr; r++) {
    float* p = C + r * ldc;
    __m512 r0, r1;
    if (beta == 0.0f) { r0 = _mm512_mul_ps(va, c0[r]); r1 = _mm512_mul_ps(va, c1[r]); }
    else {
      r0 = _mm512_fmadd_ps(va, c0[r], _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(k0, p)));
      r1 = _mm512_fmadd_ps(va, c1[r], _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(k1, p + 16)));
    }
    _mm512_mask_storeu_ps(p, k0, r0);
    _mm512_mask_storeu_ps(p + 16, k1, r1);
  }
}
#endif

inline const Kern& kern() {
  static const Kern k = [] {
#ifdef DQ_X86
    __builtin_cpu_init();
    if (getenv("DQLORA_CPU_ISA") == nullptr || std::strcmp(getenv("DQLORA_CPU_ISA"), "avx512") == 0)
      if (__builtin_cpu_supports("avx512f")) return Kern{12, 32, ukrAvx512, "avx512"};
    if (getenv("DQLORA_CPU_ISA") == nullptr || std::strcmp(getenv("DQLORA_CPU_ISA"), "scalar") != 0)
      if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Kern{6, 16, ukrAvx2, "avx2"};
#endif
    return Kern{4, 4, ukrScalar, "scalar"};
  }();
  return k;
}

// ---- packing ----------------------------------------------------------------------------------------------------

constexpr int KC = 256, MC = 192, NC = 256;

/** Scalar transpose of columns [kFrom, cols): out[k·ldo + r] = src[r·lds + k], k in chunks of 16 (destination in L1). */
inline void transposeScalar(const float* src, long lds, int rows, int kFrom, int cols, float* out, int ldo) {
  for (int k0 = kFrom; k0 < cols; k0 += 16) {
    int kn = std::min(16, cols - k0);
    for (int r = 0; r < rows; r++) {
      const float* s = src + r * lds + k0;
      float* o = out + (long)k0 * ldo + r;
      for (int k = 0; k < kn; k++) o[k * ldo] = s[k];
    }
  }
}

#ifdef DQ_X86
/**
 * 16 × 16 blocks in registers (unpack / shuffle network): up to 16 source rows × 16 columns are loaded, transposed,
 * and stored as 16 destination rows of `rows` lanes (masked). The scalar loop's strided single-float stores were
 * most of the packing time (A is packed this way for every GEMM, NF4 B for every forward). Pure data movement.
 */
__attribute__((target("avx512f"))) static void transposeAvx512(const float* src, long lds, int rows, int cols, float* out, int ldo) {
  // After the network, register x holds source column kOf[x].
  static const int kOf[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  const int full = cols / 16 * 16;
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int rn = std::min(16, rows - r0);
    const __mmask16 sm = rn == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rn) - 1);
    for (int k0 = 0; k0 < full; k0 += 16) {
      __m512 v[16], a[16], b[16], c[16];
      for (int r = 0; r < 16; r++) v[r] = r < rn ? _mm512_loadu_ps(src + (long)(r0 + r) * lds + k0) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < 8; i++) { a[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]); a[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]); }
#pragma GCC unroll 4
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++) {
          b[4 * i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[4 * i + j]), _mm512_castps_pd(a[4 * i + j + 2])));
          b[4 * i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[4 * i + j]), _mm512_castps_pd(a[4 * i + j + 2])));
        }
#pragma GCC unroll 2
      for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
          c[8 * i + j] = _mm512_shuffle_f32x4(b[8 * i + j], b[8 * i + j + 4], 0x88);
          c[8 * i + j + 4] = _mm512_shuffle_f32x4(b[8 * i + j], b[8 * i + j + 4], 0xdd);
        }
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++) {
        _mm512_mask_storeu_ps(out + (long)(k0 + kOf[j]) * ldo + r0, sm, _mm512_shuffle_f32x4(c[j], c[j + 8], 0x88));
        _mm512_mask_storeu_ps(out + (long)(k0 + kOf[j + 8]) * ldo + r0, sm, _mm512_shuffle_f32x4(c[j], c[j + 8], 0xdd));
      }
    }
  }
  if (full < cols) transposeScalar(src, lds, rows, full, cols, out, ldo);
}
#endif

/** out[k·ldo + r] = src[r·lds + k] for r < rows, k < cols. */
inline void transposeInto(const float* src, long lds, int rows, int cols, float* out, int ldo) {
#ifdef DQ_X86
  if (cols >= 16 && std::strcmp(kern().name, "avx512") == 0) { transposeAvx512(src, lds, rows, cols, out, ldo); return; }
#endif
  transposeScalar(src, lds, rows, 0, cols, out, ldo);
}

/** Dequantizes n consecutive flat NF4 elements starting at f into out[0..n): one scaled 16-entry table per block. */
inline void nf4Run(const BSrc& B, long f, int n, float* out) {
  float lut[16];
  long end = f + n;
  while (f < end) {
    long blk = B.bshift >= 0 ? (f >> B.bshift) : (f / B.bs);
    long bEnd = std::min(end, (blk + 1) * (long)B.bs);
    float sc = B.absmax[blk];
    for (int c = 0; c < 16; c++) lut[c] = B.table[c] * sc;
    if (f & 1) *out++ = lut[B.packed[f >> 1] & 15], f++;
    for (; f + 1 < bEnd; f += 2) {
      uint8_t byte = B.packed[f >> 1];
      out[0] = lut[byte >> 4];
      out[1] = lut[byte & 15];
      out += 2;
    }
    if (f < bEnd) *out++ = lut[B.packed[f >> 1] >> 4], f++;
  }
}


/** Rows [i0, i0+mc) × k [p0, p0+kc) of A' into MR-row panels: out[(panel·kc + k)·MR + r], zero-padded. */
inline void packA(const ASrc& A, int i0, int mc, int p0, int kc, int MR, float* out) {
  for (int ip = 0; ip < mc; ip += MR) {
    int mr = std::min(MR, mc - ip);
    float* o = out + (long)ip * kc;
    if (A.cs == 1) {
      transposeInto(A.a + (long)(i0 + ip) * A.rs + p0, A.rs, mr, kc, o, MR);
    } else {
      for (int k = 0; k < kc; k++) {
        const float* src = A.a + (long)(p0 + k) * A.cs + (long)(i0 + ip) * A.rs;
        for (int r = 0; r < mr; r++) o[k * MR + r] = src[r * A.rs];
      }
    }
    for (int r = mr; r < MR; r++)
      for (int k = 0; k < kc; k++) o[k * MR + r] = 0.0f;
  }
}

/** k [p0, p0+kc) × columns [j0, j0+nc) of B' into NR-column panels: out[(panel·kc + k)·NR + c], zero-padded. */
inline void packB(const BSrc& B, int p0, int kc, int j0, int nc, int NR, float* out, float* tmp) {
  for (int jp = 0; jp < nc; jp += NR) {
    int nr = std::min(NR, nc - jp);
    float* o = out + (long)jp * kc;
    if (B.packed) {
      if (B.fj == 1) {  // dx = dy·W: a k-row of B' is a contiguous run of W's row
        for (int k = 0; k < kc; k++) nf4Run(B, (long)(p0 + k) * B.fk + (j0 + jp), nr, o + k * NR);
      } else {  // y = x·Wᵀ: a column of B' is a contiguous run of W's row: dequantize runs, then transpose
        float* t = tmp;
        for (int c = 0; c < nr; c++) nf4Run(B, (long)(j0 + jp + c) * B.fj + p0, kc, t + (long)c * kc);
        transposeInto(t, kc, nr, kc, o, NR);
      }
    } else if (B.cs == 1) {
      for (int k = 0; k < kc; k++) {
        const float* src = B.b + (long)(p0 + k) * B.rs + (j0 + jp);
        for (int c = 0; c < nr; c++) o[k * NR + c] = src[c];
      }
    } else {
      transposeInto(B.b + (long)(j0 + jp) * B.cs + (long)p0 * B.rs, B.cs, nr, kc, o, NR);
    }
    if (nr < NR)
      for (int k = 0; k < kc; k++)
        for (int c = nr; c < NR; c++) o[k * NR + c] = 0.0f;
  }
}

// ---- driver -----------------------------------------------------------------------------------------------------

/** One job: C rows [i0, i1) × columns [j0, j1), full K. */
inline void gemmTile(int K, float alpha, const ASrc& A, const BSrc& B, float beta, float* C, long ldc,
                     int i0, int i1, int j0, int j1, Scratch& s) {
  const Kern& kn = kern();
  if (K == 0) {
    for (int i = i0; i < i1; i++)
      for (int j = j0; j < j1; j++) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  float* bp = s.b.get((size_t)KC * (NC + kn.NR));
  float* tp = B.packed ? s.d.get((size_t)KC * kn.NR) : nullptr;
  float* ap = s.a.get((size_t)KC * (MC + kn.MR));
  for (int pc = 0; pc < K; pc += KC) {
    int kc = std::min(KC, K - pc);
    float bet = pc == 0 ? beta : 1.0f;
    for (int jc = j0; jc < j1; jc += NC) {
      int nc = std::min(NC, j1 - jc);
      packB(B, pc, kc, jc, nc, kn.NR, bp, tp);
      for (int ic = i0; ic < i1; ic += MC) {
        int mc = std::min(MC, i1 - ic);
        packA(A, ic, mc, pc, kc, kn.MR, ap);
        for (int jr = 0; jr < nc; jr += kn.NR)
          for (int ir = 0; ir < mc; ir += kn.MR)
            kn.ukr(kc, ap + (long)ir * kc, bp + (long)jr * kc, C + (long)(ic + ir) * ldc + jc + jr, ldc,
                   std::min(kn.MR, mc - ir), std::min(kn.NR, nc - jr), alpha, bet);
      }
    }
  }
}

/** Whole GEMM in the calling thread (used inside other parallel kernels). */
inline void gemmSerial(int M, int N, int K, float alpha, const ASrc& A, const BSrc& B, float beta, float* C, long ldc, Scratch& s) {
  if (M > 0 && N > 0) gemmTile(K, alpha, A, B, beta, C, ldc, 0, M, 0, N, s);
}

// ---- skinny products (LoRA: one side of C is the rank r ≤ 16) -------------------------------------------------------
// C [M, N] with N ≤ 16 (x·Aᵀ, dy·B, dyᵀ·u) or M ≤ 16 (duᵀ·x, run as its transpose). Packing A for such a product
// costs as much as the product itself (each A element meets only N ≤ 16 columns), so these kernels broadcast A'(i, k)
// straight from memory (any strides) against one packed, zero-padded 16-wide row of B' per k. Every element of C is
// one accumulator summed over k ascending, then alpha·acc + beta·C: the same bits for any thread count (jobs are
// row blocks of C).

constexpr int kSkinnyN = 16;

/** C(i, j) lives at c[i·crs + j·ccs]: the transposed problem writes C through swapped strides. */
struct CDst { float* c; long rs, cs; };

static inline void skinnyStore(const float* acc, const CDst& C, long i, int n, float alpha, float beta) {
  float* p = C.c + i * C.rs;
  for (int j = 0; j < n; j++) {
    float* q = p + j * C.cs;
    *q = beta == 0.0f ? alpha * acc[j] : alpha * acc[j] + beta * *q;
  }
}

/** Rows [i0, i1) of C; bp = B' packed [K][16]. */
static void skinnyScalar(const ASrc& A, const float* bp, int K, int n, float alpha, float beta, const CDst& C, long i0, long i1) {
  for (long i = i0; i < i1; i++) {
    float acc[kSkinnyN] = {0};
    const float* a = A.a + i * A.rs;
    for (int k = 0; k < K; k++) {
      float av = a[k * A.cs];
      for (int j = 0; j < kSkinnyN; j++) acc[j] += av * bp[k * kSkinnyN + j];
    }
    skinnyStore(acc, C, i, n, alpha, beta);
  }
}

#ifdef DQ_X86
__attribute__((target("avx512f"))) static void skinnyAvx512(const ASrc& A, const float* bp, int K, int n, float alpha, float beta,
                                                           const CDst& C, long i0, long i1) {
  constexpr int R = 12;
  alignas(64) float out[kSkinnyN];
  long i = i0;
  for (; i + R <= i1; i += R) {
    __m512 acc[R];
#pragma GCC unroll 12
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const float* a = A.a + i * A.rs;
    for (int k = 0; k < K; k++) {
      __m512 b = _mm512_load_ps(bp + k * kSkinnyN);
      const float* ak = a + k * A.cs;
#pragma GCC unroll 12
      for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ak[r * A.rs]), b, acc[r]);
    }
    for (int r = 0; r < R; r++) { _mm512_store_ps(out, acc[r]); skinnyStore(out, C, i + r, n, alpha, beta); }
  }
  for (; i < i1; i++) {  // the same arithmetic one row at a time
    __m512 acc = _mm512_setzero_ps();
    const float* a = A.a + i * A.rs;
    for (int k = 0; k < K; k++) acc = _mm512_fmadd_ps(_mm512_set1_ps(a[k * A.cs]), _mm512_load_ps(bp + k * kSkinnyN), acc);
    _mm512_store_ps(out, acc);
    skinnyStore(out, C, i, n, alpha, beta);
  }
}

__attribute__((target("avx2,fma"))) static void skinnyAvx2(const ASrc& A, const float* bp, int K, int n, float alpha, float beta,
                                                         const CDst& C, long i0, long i1) {
  constexpr int R = 6;
  alignas(32) float out[kSkinnyN];
  long i = i0;
  for (; i + R <= i1; i += R) {
    __m256 c0[R], c1[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) { c0[r] = _mm256_setzero_ps(); c1[r] = _mm256_setzero_ps(); }
    const float* a = A.a + i * A.rs;
    for (int k = 0; k < K; k++) {
      __m256 b0 = _mm256_load_ps(bp + k * kSkinnyN), b1 = _mm256_load_ps(bp + k * kSkinnyN + 8);
      const float* ak = a + k * A.cs;
#pragma GCC unroll 6
      for (int r = 0; r < R; r++) {
        __m256 av = _mm256_broadcast_ss(ak + r * A.rs);
        c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
        c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
      }
    }
    for (int r = 0; r < R; r++) {
      _mm256_store_ps(out, c0[r]); _mm256_store_ps(out + 8, c1[r]);
      skinnyStore(out, C, i + r, n, alpha, beta);
    }
  }
  for (; i < i1; i++) {
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    const float* a = A.a + i * A.rs;
    for (int k = 0; k < K; k++) {
      __m256 av = _mm256_broadcast_ss(a + k * A.cs);
      c0 = _mm256_fmadd_ps(av, _mm256_load_ps(bp + k * kSkinnyN), c0);
      c1 = _mm256_fmadd_ps(av, _mm256_load_ps(bp + k * kSkinnyN + 8), c1);
    }
    _mm256_store_ps(out, c0); _mm256_store_ps(out + 8, c1);
    skinnyStore(out, C, i, n, alpha, beta);
  }
}
#endif

/** C [M, n ≤ 16] = alpha · A' · B' + beta · C, B' dense. K ≥ 1. */
inline void gemmSkinny(long M, int n, int K, float alpha, const ASrc& A, const BSrc& B, float beta, const CDst& C, int threads) {
  // B' [K, n] → [K][16], zero-padded (the padding lanes are computed and never stored).
  float* bp = static_cast<float*>(std::aligned_alloc(64, ((size_t)K * kSkinnyN * sizeof(float) + 63) / 64 * 64));
  if (!bp) throw std::bad_alloc();
  for (int k = 0; k < K; k++)
    for (int j = 0; j < kSkinnyN; j++) bp[k * kSkinnyN + j] = j < n ? B.b[k * B.rs + j * B.cs] : 0.0f;
  auto fn = skinnyScalar;
#ifdef DQ_X86
  if (std::strcmp(kern().name, "avx512") == 0) fn = skinnyAvx512;
  else if (std::strcmp(kern().name, "avx2") == 0) fn = skinnyAvx2;
#endif
  const long flops = 2L * M * kSkinnyN * K;
  const long rowsPer = threads <= 1 || flops < 1000000L ? M : std::max(12L, ((M + 4L * threads - 1) / (4L * threads) + 11) / 12 * 12);
  const int jobs = (int)((M + rowsPer - 1) / rowsPer);
  if (jobs <= 1) fn(A, bp, K, n, alpha, beta, C, 0, M);
  else pool().run(jobs, threads, [&](int j, int) { fn(A, bp, K, n, alpha, beta, C, (long)j * rowsPer, std::min(M, (long)(j + 1) * rowsPer)); });
  std::free(bp);
}

/**
 * Parallel GEMM over (row group × column panel) jobs. Column panels are NC wide, narrower (down to one NR
 * panel) when C has few columns, so that skinny products still give every thread work; row groups split M.
 */
inline void gemmParallel(int M, int N, int K, float alpha, const ASrc& A, const BSrc& B, float beta, float* C, long ldc, int threads) {
  if (M <= 0 || N <= 0) return;
  const Kern& kn = kern();
  threads = std::max(1, std::min(threads, kMaxThreads));
  if (!B.packed && K > 0 && (N <= kSkinnyN || M <= kSkinnyN)) {
    if (N <= kSkinnyN) {
      gemmSkinny(M, N, K, alpha, A, B, beta, CDst{C, ldc, 1}, threads);
    } else {  // Cᵀ [N, M] = B'ᵀ · A'ᵀ, written through swapped strides
      BSrc Bt; Bt.b = A.a; Bt.rs = A.cs; Bt.cs = A.rs;
      gemmSkinny(N, M, K, alpha, ASrc{B.b, B.cs, B.rs}, Bt, beta, CDst{C, 1, ldc}, threads);
    }
    return;
  }
  const long flops = 2L * M * N * std::max(K, 1);
  if (threads == 1 || flops < 2000000L) {
    gemmSerial(M, N, K, alpha, A, B, beta, C, ldc, scratch()[0]);
    return;
  }
  // Pick (column panel width, row groups) minimising an estimate of the busiest thread's time: its FMAs plus
  // its packing (A rows re-packed for every column panel, B re-packed for every row group; dequantizing NF4
  // costs more per element). Any choice gives the same bits; this only decides speed.
  const double packA = 16, packB = B.packed ? 48 : 16;
  double bestCost = 1e300;
  int nw = NC, mg = M;
  for (int w = NC; w >= kn.NR; w /= 2) {
    int nCol = (N + w - 1) / w;
    for (int rg = 1; rg <= std::max(1, M / kn.MR); rg = rg < 8 ? rg + 1 : rg * 2) {
      int rows = ((M + rg - 1) / rg + kn.MR - 1) / kn.MR * kn.MR;
      int groups = (M + rows - 1) / rows, jobs = groups * nCol;
      int cols = std::min(w, N);
      double perJob = (double)rows * cols * std::max(K, 1) + packA * rows * K + packB * (double)K * cols;
      double cost = std::ceil((double)jobs / threads) * perJob;
      if (cost < bestCost * 0.97) { bestCost = cost; nw = w; mg = rows; }
      if (rows <= kn.MR) break;
    }
    if (w <= kn.NR) break;
  }
  int nCol = (N + nw - 1) / nw;
  int rowGroups = (M + mg - 1) / mg;
  pool().run(rowGroups * nCol, threads, [&](int job, int tid) {
    int rg = job / nCol, cp = job % nCol;
    int i0 = rg * mg, i1 = std::min(M, i0 + mg), j0 = cp * nw, j1 = std::min(N, j0 + nw);
    gemmTile(K, alpha, A, B, beta, C, ldc, i0, i1, j0, j1, scratch()[tid]);
  });
}

}  // namespace dq
