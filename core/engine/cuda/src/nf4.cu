// NF4 with double quantization on the GPU (qlora-spec §1–2, layout of core/engine/nf4.ts).
//
// Quantize is bit-identical to the CPU reference quantizeNf4 (core/engine/nf4.ts): the block scale's
// reciprocal is the IEEE float32 one (__frcp_rn) and every product/difference is a separately rounded
// __fmul_rn/__fsub_rn (no FMA contraction). Deviation from bitsandbytes, documented: bnb's CUDA build uses
// --use_fast_math (rcp.approx.ftz), which can differ by an ulp and flip a code for a value within ~1 ulp of a
// threshold; we follow the project's CPU reference instead so that CPU and GPU workers produce the same files.
#include "ops.h"

namespace dq {

__constant__ float kNf4Thresholds[16] = {
    -0.8480963706970215f, -0.6106328964233398f, -0.4599952697753906f, -0.33967941999435425f,
    -0.23460739850997925f, -0.13791173696517944f, -0.045525018125772476f, 0.03979014977812767f,
    0.120255246758461f,   0.2035212516784668f,  0.2920137643814087f,  0.3893125355243683f,
    0.5016634464263916f,  0.6427869200706482f,  0.8614784479141235f,  3.402823466e38f /* never read: the search tops out at index 14 */};

// Number of thresholds strictly below xn (ties → lower code, NaN → 0), as nf4.ts's nf4Code.
__device__ __forceinline__ uint32_t nf4Code(float xn) {
  uint32_t c = 0;
  if (xn > kNf4Thresholds[c + 7]) c += 8;
  if (xn > kNf4Thresholds[c + 3]) c += 4;
  if (xn > kNf4Thresholds[c + 1]) c += 2;
  if (xn > kNf4Thresholds[c]) c += 1;
  return c;
}

// ---- dequantize: one thread per packed byte -------------------------------------------------------------------
__device__ __forceinline__ float blockScale(const Nf4Dev& w, int64_t b) {
  if (!w.absmaxU8) return ((const float*)w.absmax)[b];
  uint8_t code = ((const uint8_t*)w.absmax)[b];
  // Two separate float32 roundings, as bitsandbytes (8-bit dequant kernel, then a torch +=).
  return __fadd_rn(__fmul_rn(w.nestedMap[code], w.nestedAbsmax[b / w.nestedBlocksize]), w.offset);
}

template <class T>
__global__ void nf4DequantK(Nf4Dev w, T* out) {
  int64_t bytes = (w.n + 1) / 2;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < bytes; j += (int64_t)gridDim.x * blockDim.x) {
    int64_t i = 2 * j;
    float s = blockScale(w, i / w.blocksize);  // blocksize is even: both nibbles share a block
    uint8_t byte = w.packed[j];
    st(out, i, __fmul_rn(w.quantMap[byte >> 4], s));
    if (i + 1 < w.n) st(out, i + 1, __fmul_rn(w.quantMap[byte & 15], s));
  }
}

void nf4Dequant(const Nf4Dev& w, void* out, int outDt) {
  if (w.n == 0) return;
  REQUIRE(w.blocksize >= 2 && w.blocksize % 2 == 0, "nf4 blocksize must be even");
  REQUIRE(!w.absmaxU8 || (w.nestedAbsmax && w.nestedMap && w.nestedBlocksize > 0), "nf4 nested state missing");
  size_t bytes = (size_t)(w.n + 1) / 2;
  DISPATCH_FLOAT(outDt, T, { nf4DequantK<T><<<blocksFor(bytes, 256), 256, 0, stream()>>>(w, (T*)out); });
  KERNEL_CHECK();
}

// ---- quantize: one warp per quantization block ----------------------------------------------------------------
template <class T>
__global__ void nf4QuantizeK(const T* __restrict__ x, int64_t n, int bs, int64_t nblocks, uint8_t* packed,
                             float* absmax) {
  int lane = threadIdx.x & 31;
  int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t b = warp; b < nblocks; b += warps) {
    int64_t s = b * bs, e = min(n, s + bs);
    float m = 0.f;
    for (int64_t i = s + lane; i < e; i += 32) {
      float a = fabsf(ld(x, i));
      if (a > m) m = a;  // skips NaN, like fmaxf and the CPU's `a > m`
    }
    for (int o = 16; o > 0; o >>= 1) {
      float other = __shfl_xor_sync(0xffffffffu, m, o);
      if (other > m) m = other;
    }
    if (lane == 0) absmax[b] = m;
    float inv = __frcp_rn(m);  // IEEE 1/m: +Inf for an all-zero block → 0·Inf = NaN → code 0
    for (int64_t i = s + 2 * lane; i < e; i += 64) {
      uint32_t hi = nf4Code(__fmul_rn(ld(x, i), inv));
      uint32_t lo = nf4Code(__fmul_rn(i + 1 < e ? ld(x, i + 1) : 0.f, inv));  // odd n: padded lane is 0.0
      packed[i >> 1] = (uint8_t)((hi << 4) | lo);
    }
  }
}

void nf4Quantize(const void* w, int wDt, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
  if (n == 0) return;
  REQUIRE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, "nf4 blocksize must be a power of two in 32..4096");
  int64_t nb = (n + blocksize - 1) / blocksize;
  unsigned blocks = blocksFor((size_t)nb * 32, 256);
  DISPATCH_FLOAT(wDt, T, { nf4QuantizeK<T><<<blocks, 256, 0, stream()>>>((const T*)w, n, blocksize, nb, packed, absmax); });
  KERNEL_CHECK();
}

// ---- double quantization: absmax − offset → 8-bit signed dynamic map, one warp per nested block -------------------
// Nearest map entry by float32 distance, ties to the lower index (nf4.ts quantizeBlockwise8).
__global__ void nf4DoubleQuantK(const float* __restrict__ a, int64_t nb, float offset, const float* __restrict__ map,
                                int nbs, uint8_t* codes, float* nestedAbsmax) {
  __shared__ float smap[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) smap[i] = map[i];
  __syncthreads();
  int lane = threadIdx.x & 31;
  int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  int64_t chunks = (nb + nbs - 1) / nbs;
  for (int64_t c = warp; c < chunks; c += warps) {
    int64_t s = c * nbs, e = min(nb, s + nbs);
    float m = 0.f;
    for (int64_t i = s + lane; i < e; i += 32) {
      float v = fabsf(__fsub_rn(a[i], offset));
      if (v > m) m = v;
    }
    for (int o = 16; o > 0; o >>= 1) {
      float other = __shfl_xor_sync(0xffffffffu, m, o);
      if (other > m) m = other;
    }
    if (lane == 0) nestedAbsmax[c] = m;
    float inv = __frcp_rn(m);
    for (int64_t i = s + lane; i < e; i += 32) {
      float y = __fmul_rn(__fsub_rn(a[i], offset), inv);
      int code;
      if (!(y > smap[0])) code = 0;
      else if (y >= smap[255]) code = 255;
      else {
        int lo = 0, hi = 255;  // largest lo with map[lo] <= y
        while (hi - lo > 1) {
          int mid = (lo + hi) >> 1;
          if (smap[mid] <= y) lo = mid; else hi = mid;
        }
        float dLo = __fsub_rn(y, smap[lo]), dHi = __fsub_rn(smap[lo + 1], y);
        code = dHi < dLo ? lo + 1 : lo;
      }
      codes[i] = (uint8_t)code;
    }
  }
}

void nf4DoubleQuant(const float* absmax, int64_t nb, float offset, const float* map256, int nestedBlocksize,
                    uint8_t* codes, float* nestedAbsmax) {
  if (nb == 0) return;
  REQUIRE(nestedBlocksize > 0, "nested blocksize must be positive");
  int64_t chunks = (nb + nestedBlocksize - 1) / nestedBlocksize;
  unsigned blocks = blocksFor((size_t)chunks * 32, 256);
  nf4DoubleQuantK<<<blocks, 256, 0, stream()>>>(absmax, nb, offset, map256, nestedBlocksize, codes, nestedAbsmax);
  KERNEL_CHECK();
}

}  // namespace dq
