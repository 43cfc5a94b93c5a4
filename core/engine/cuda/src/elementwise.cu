// Elementwise ops, reductions, norms, RoPE, SwiGLU, dropout, embedding and AdamW.
// Activations are bf16 or f32 (templated via DISPATCH_FLOAT); arithmetic is always f32.
#include "ops.h"

namespace dq {

// ---- conversions, axpy, scale ----------------------------------------------------------------------
template <class S, class D>
__global__ void convertK(const S* __restrict__ s, D* __restrict__ d, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    st(d, i, ld(s, i));
}

void convert(const void* src, int srcDt, void* dst, int dstDt, size_t n) {
  if (n == 0) return;
  DISPATCH_FLOAT(srcDt, S, DISPATCH_FLOAT(dstDt, D, {
    convertK<S, D><<<blocksFor(n, 256), 256, 0, stream()>>>((const S*)src, (D*)dst, n);
  }));
  KERNEL_CHECK();
}

template <class A, class B>
__global__ void axpyK(A* a, const B* __restrict__ b, size_t n, float alpha) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    st(a, i, ld(a, i) + alpha * ld(b, i));
}

void axpy(void* a, int aDt, const void* b, int bDt, size_t n, float alpha) {
  if (n == 0) return;
  DISPATCH_FLOAT(aDt, A, DISPATCH_FLOAT(bDt, B, {
    axpyK<A, B><<<blocksFor(n, 256), 256, 0, stream()>>>((A*)a, (const B*)b, n, alpha);
  }));
  KERNEL_CHECK();
}

template <class T>
__global__ void scaleK(T* a, size_t n, float s) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    st(a, i, ld(a, i) * s);
}

void scale(void* a, int dt, size_t n, float s) {
  if (n == 0) return;
  DISPATCH_FLOAT(dt, T, { scaleK<T><<<blocksFor(n, 256), 256, 0, stream()>>>((T*)a, n, s); });
  KERNEL_CHECK();
}

// ---- reductions ------------------------------------------------------------------------------------------
template <class V>
__device__ V blockSum(V v, V* shared /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  int nw = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nw ? shared[threadIdx.x] : V(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0 (and all of warp 0)
}

// Per-block partial sums in float64, written to partial[blockIdx.x]; summed on the host in a fixed order,
// so the result does not depend on scheduling.
template <class T>
__global__ void sumSquaresK(const T* __restrict__ a, size_t n, double* partial) {
  __shared__ double sh[32];
  double acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    double x = ld(a, i);
    acc += x * x;
  }
  acc = blockSum(acc, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

double sumSquares(const void* a, int dt, size_t n) {
  if (n == 0) return 0;
  unsigned blocks = blocksFor(n, 256, 1024);
  Scratch partial(blocks * sizeof(double));
  DISPATCH_FLOAT(dt, T, { sumSquaresK<T><<<blocks, 256, 0, stream()>>>((const T*)a, n, partial.as<double>()); });
  KERNEL_CHECK();
  double host[1024];
  CUDA_CHECK(cudaMemcpyAsync(host, partial.p, blocks * sizeof(double), cudaMemcpyDeviceToHost, stream()));
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  double s = 0;
  for (unsigned i = 0; i < blocks; i++) s += host[i];
  return s;
}

// sumRows: pass 1 sums row chunks into part [chunks, C]; pass 2 sums the chunks in order (deterministic).
template <class T>
__global__ void sumRowsPartK(const T* __restrict__ x, int64_t N, int64_t C, int64_t rowsPerChunk, float* part) {
  int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  int64_t r0 = blockIdx.y * rowsPerChunk, r1 = min(N, r0 + rowsPerChunk);
  float acc = 0;
  for (int64_t r = r0; r < r1; r++) acc += ld(x, r * C + c);
  part[blockIdx.y * C + c] = acc;
}
__global__ void sumChunksK(const float* __restrict__ part, int chunks, int64_t C, float* out) {
  int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0;
  for (int k = 0; k < chunks; k++) acc += part[k * C + c];
  out[c] = acc;
}

void sumRows(const void* x, int dt, int64_t N, int64_t C, float* out) {
  if (C == 0) return;
  int64_t rowsPerChunk = 64;
  int chunks = (int)std::max<int64_t>(1, (N + rowsPerChunk - 1) / rowsPerChunk);
  if (chunks > 4096) { chunks = 4096; rowsPerChunk = (N + chunks - 1) / chunks; }
  Scratch part((size_t)chunks * C * sizeof(float));
  dim3 grid((unsigned)((C + 255) / 256), chunks);
  DISPATCH_FLOAT(dt, T, { sumRowsPartK<T><<<grid, 256, 0, stream()>>>((const T*)x, N, C, rowsPerChunk, part.as<float>()); });
  KERNEL_CHECK();
  sumChunksK<<<(unsigned)((C + 255) / 256), 256, 0, stream()>>>(part.as<float>(), chunks, C, out);
  KERNEL_CHECK();
}

template <class Y, class Bt>
__global__ void addBiasK(Y* y, const Bt* __restrict__ b, int64_t N, int64_t C) {
  size_t total = (size_t)N * C;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
    st(y, i, ld(y, i) + ld(b, i % C));
}

void addBias(void* y, int yDt, const void* bias, int bDt, int64_t N, int64_t C) {
  size_t n = (size_t)N * C;
  if (n == 0) return;
  DISPATCH_FLOAT(yDt, Y, DISPATCH_FLOAT(bDt, Bt, {
    addBiasK<Y, Bt><<<blocksFor(n, 256), 256, 0, stream()>>>((Y*)y, (const Bt*)bias, N, C);
  }));
  KERNEL_CHECK();
}

// ---- SwiGLU ------------------------------------------------------------------------------------------------
template <class T>
__global__ void swigluK(const T* __restrict__ g, const T* __restrict__ u, T* h, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float x = ld(g, i);
    float s = 1.f / (1.f + expf(-x));
    st(h, i, x * s * ld(u, i));
  }
}
template <class T>
__global__ void swigluBackK(const T* __restrict__ dh, const T* __restrict__ g, const T* __restrict__ u, T* dg, T* du,
                            size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float x = ld(g, i), d = ld(dh, i), up = ld(u, i);
    float s = 1.f / (1.f + expf(-x));
    float silu = x * s;
    st(du, i, d * silu);
    st(dg, i, d * up * s * (1.f + x * (1.f - s)));
  }
}
void swiglu(const void* g, const void* u, void* h, int dt, size_t n) {
  if (n == 0) return;
  DISPATCH_FLOAT(dt, T, { swigluK<T><<<blocksFor(n, 256), 256, 0, stream()>>>((const T*)g, (const T*)u, (T*)h, n); });
  KERNEL_CHECK();
}
void swigluBackward(const void* dh, const void* g, const void* u, void* dg, void* du, int dt, size_t n) {
  if (n == 0) return;
  DISPATCH_FLOAT(dt, T, {
    swigluBackK<T><<<blocksFor(n, 256), 256, 0, stream()>>>((const T*)dh, (const T*)g, (const T*)u, (T*)dg, (T*)du, n);
  });
  KERNEL_CHECK();
}

// ---- dropout (Philox4x32-10, bit-identical to common/rng.ts) -------------------------------------------------
__device__ __forceinline__ uint32_t philoxWord0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                uint32_t k1) {
  const uint32_t M0 = 0xd2511f53u, M1 = 0xcd9e8d57u, W0 = 0x9e3779b9u, W1 = 0xbb67ae85u;
#pragma unroll
  for (int r = 0; r < 10; r++) {
    uint32_t hi0 = __umulhi(M0, c0), lo0 = M0 * c0;
    uint32_t hi1 = __umulhi(M1, c2), lo1 = M1 * c2;
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += W0; k1 += W1;
  }
  return c0;
}

// Element (n, j) of x [N, C] is kept iff (philox(j, rowPos[n], rowSample[n], stream; k0, k1).word0 >> 8) ≥
// threshold24, where threshold24 = ceil(p · 2^24) — exactly rng.ts's `u32ToUnit(w) >= p` in integers.
template <class T>
__global__ void dropoutK(const T* __restrict__ x, T* y, int64_t N, int64_t C, uint32_t thr, float scale, uint32_t k0,
                         uint32_t k1, uint32_t sw, const int32_t* __restrict__ rowSample,
                         const int32_t* __restrict__ rowPos) {
  size_t total = (size_t)N * C;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    int64_t n = i / C, j = i % C;
    uint32_t w = philoxWord0((uint32_t)j, (uint32_t)rowPos[n], (uint32_t)rowSample[n], sw, k0, k1);
    st(y, i, (w >> 8) >= thr ? ld(x, i) * scale : 0.f);
  }
}
void dropout(const void* x, void* y, int dt, int64_t N, int64_t C, uint32_t threshold24, float scale, uint32_t k0,
             uint32_t k1, uint32_t streamWord, const int32_t* rowSample, const int32_t* rowPos) {
  size_t n = (size_t)N * C;
  if (n == 0) return;
  DISPATCH_FLOAT(dt, T, {
    dropoutK<T><<<blocksFor(n, 256), 256, 0, stream()>>>((const T*)x, (T*)y, N, C, threshold24, scale, k0, k1,
                                                         streamWord, rowSample, rowPos);
  });
  KERNEL_CHECK();
}

// ---- AdamW (torch.optim.AdamW, single-tensor path) -----------------------------------------------------------
// p ← p·(1 − lr·wd); m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²; p ← p − stepSize · m / (sqrt(v)/sqrt(bc2) + eps)
// with stepSize = lr / bc1 (bias corrections computed on the host in float64, like torch's Python floats).
__global__ void adamwK(float* p, const float* __restrict__ g, float* m, float* v, size_t n, float beta1, float beta2,
                       float eps, float decay, float stepSize, float bc2Sqrt) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i];
    float pi = p[i] * decay;
    float mi = m[i] + (1.f - beta1) * (gi - m[i]);
    float vi = v[i] * beta2 + (1.f - beta2) * gi * gi;
    float denom = sqrtf(vi) / bc2Sqrt + eps;
    p[i] = pi - stepSize * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}
void adamw(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps,
           float decay, float stepSize, float bc2Sqrt) {
  (void)lr;
  if (n == 0) return;
  adamwK<<<blocksFor(n, 256), 256, 0, stream()>>>(p, g, m, v, n, beta1, beta2, eps, decay, stepSize, bc2Sqrt);
  KERNEL_CHECK();
}

// ---- embedding -----------------------------------------------------------------------------------------------
template <class S, class D>
__global__ void embeddingK(const int32_t* __restrict__ ids, const S* __restrict__ table, D* out, int64_t N, int64_t H,
                           int64_t V, int* bad) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    int32_t id = ids[n];
    bool ok = id >= 0 && id < V;
    if (!ok && threadIdx.x == 0) atomicAdd(bad, 1);
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) st(out, n * H + h, ok ? ld(table, (int64_t)id * H + h) : 0.f);
  }
}
int embedding(const int32_t* ids, const void* table, int tDt, void* out, int oDt, int64_t N, int64_t H, int64_t V) {
  if (N == 0) return 0;
  Scratch bad(sizeof(int));
  CUDA_CHECK(cudaMemsetAsync(bad.p, 0, sizeof(int), stream()));
  unsigned blocks = (unsigned)std::min<int64_t>(N, 65535);
  DISPATCH_FLOAT(tDt, S, DISPATCH_FLOAT(oDt, D, {
    embeddingK<S, D><<<blocks, 256, 0, stream()>>>(ids, (const S*)table, (D*)out, N, H, V, bad.as<int>());
  }));
  KERNEL_CHECK();
  int host = 0;
  CUDA_CHECK(cudaMemcpyAsync(&host, bad.p, sizeof(int), cudaMemcpyDeviceToHost, stream()));
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  return host;
}

// ---- RMSNorm: one block per row -----------------------------------------------------------------------------
template <class X, class W>
__global__ void rmsnormK(const X* __restrict__ x, const W* __restrict__ w, X* y, float* rstd, int64_t H, float eps) {
  __shared__ float sh[32];
  __shared__ float r;
  int64_t row = blockIdx.x;
  const X* xr = x + row * H;
  float acc = 0;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) { float v = ld(xr, h); acc += v * v; }
  acc = blockSum(acc, sh);
  if (threadIdx.x == 0) { r = 1.f / sqrtf(acc / (float)H + eps); rstd[row] = r; }
  __syncthreads();
  float rr = r;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) st(y, row * H + h, ld(xr, h) * rr * ld(w, h));
}
// dx_i = r·w_i·dy_i − x_i · r³/H · Σ_j dy_j·w_j·x_j
template <class X, class W>
__global__ void rmsnormBackK(const X* __restrict__ dy, const X* __restrict__ x, const W* __restrict__ w,
                             const float* __restrict__ rstd, X* dx, int64_t H) {
  __shared__ float sh[32];
  __shared__ float dot;
  int64_t row = blockIdx.x;
  const X* xr = x + row * H;
  const X* dyr = dy + row * H;
  float acc = 0;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) acc += ld(dyr, h) * ld(w, h) * ld(xr, h);
  acc = blockSum(acc, sh);
  if (threadIdx.x == 0) dot = acc;
  __syncthreads();
  float r = rstd[row];
  float c = dot * r * r * r / (float)H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) st(dx, row * H + h, r * ld(w, h) * ld(dyr, h) - ld(xr, h) * c);
}
void rmsnorm(const void* x, int xDt, const void* w, int wDt, void* y, float* rstd, int64_t N, int64_t H, float eps) {
  if (N == 0) return;
  REQUIRE(N <= 0x7fffffff, "rmsnorm: too many rows");
  DISPATCH_FLOAT(xDt, X, DISPATCH_FLOAT(wDt, W, {
    rmsnormK<X, W><<<(unsigned)N, 256, 0, stream()>>>((const X*)x, (const W*)w, (X*)y, rstd, H, eps);
  }));
  KERNEL_CHECK();
}
void rmsnormBackward(const void* dy, const void* x, int xDt, const void* w, int wDt, const float* rstd, void* dx,
                     int64_t N, int64_t H) {
  if (N == 0) return;
  DISPATCH_FLOAT(xDt, X, DISPATCH_FLOAT(wDt, W, {
    rmsnormBackK<X, W><<<(unsigned)N, 256, 0, stream()>>>((const X*)dy, (const X*)x, (const W*)w, rstd, (X*)dx, H);
  }));
  KERNEL_CHECK();
}

// ---- RoPE (HF rotate_half: dim i pairs with i + rd/2) --------------------------------------------------------
// y[i] = m·(x[i]·cos − x[i+h]·sin), y[i+h] = m·(x[i+h]·cos + x[i]·sin), angle = f32(pos · invFreq[i]);
// inverse rotates by −angle (the backward). Dims ≥ rotaryDim pass through unchanged.
template <class T>
__global__ void ropeK(const T* __restrict__ x, T* y, const int32_t* __restrict__ pos, const float* __restrict__ invFreq,
                      int64_t N, int64_t nh, int64_t D, int64_t rd, float mscale, float sign) {
  int64_t half = rd / 2;
  int64_t work = D - half;  // per head: `half` pairs + (D − rd) pass-through dims
  size_t total = (size_t)N * nh * work;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    int64_t d = i % work;
    int64_t row = i / work;  // n·nh + head
    int64_t n = row / nh;
    size_t base = (size_t)row * D;
    if (d < half) {
      float ang = (float)pos[n] * invFreq[d];
      float s, c;
      sincosf(ang, &s, &c);
      c *= mscale;
      s *= mscale * sign;
      float a = ld(x, base + d), b = ld(x, base + d + half);
      st(y, base + d, a * c - b * s);
      st(y, base + d + half, b * c + a * s);
    } else {
      int64_t dd = d - half + rd;  // rd .. D-1
      st(y, base + dd, ld(x, base + dd));
    }
  }
}
void rope(const void* x, void* y, int dt, const int32_t* pos, const float* invFreq, int64_t N, int64_t nh, int64_t D,
          int64_t rotaryDim, float mscale, bool inverse) {
  size_t total = (size_t)N * nh * (D - rotaryDim / 2);
  if (total == 0) return;
  DISPATCH_FLOAT(dt, T, {
    ropeK<T><<<blocksFor(total, 256), 256, 0, stream()>>>((const T*)x, (T*)y, pos, invFreq, N, nh, D, rotaryDim,
                                                           mscale, inverse ? -1.f : 1.f);
  });
  KERNEL_CHECK();
}

}  // namespace dq
