// Column-wise ops of DoRA (core/engine/dora.ts): y = x · diag(v) and the column dot products Σ_n a[n, c] · b[n, c]
// (the magnitude gradient). Deterministic: the column sums run in fixed row chunks, then over the chunks in order.
#include "ops.h"

namespace dq {
namespace {

template <class T>
__global__ void scaleColumnsK(const T* __restrict__ x, const float* __restrict__ v, T* y, int64_t N, int64_t C) {
  size_t total = (size_t)N * C;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
    st(y, i, ld(x, i) * v[i % C]);
}

template <class A, class B>
__global__ void columnDotPartK(const A* __restrict__ a, const B* __restrict__ b, int64_t N, int64_t C, int64_t rowsPerChunk,
                               float* part) {
  int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  int64_t r0 = blockIdx.y * rowsPerChunk, r1 = min(N, r0 + rowsPerChunk);
  float acc = 0;
  for (int64_t r = r0; r < r1; r++) acc += ld(a, r * C + c) * ld(b, r * C + c);
  part[blockIdx.y * C + c] = acc;
}

__global__ void columnDotSumK(const float* __restrict__ part, int chunks, int64_t C, float* out) {
  int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0;
  for (int k = 0; k < chunks; k++) acc += part[k * C + c];
  out[c] = acc;
}

}  // namespace

void scaleColumns(const void* x, void* y, int dt, const float* v, int64_t N, int64_t C) {
  size_t n = (size_t)N * C;
  if (n == 0) return;
  DISPATCH_FLOAT(dt, T, { scaleColumnsK<T><<<blocksFor(n, 256), 256, 0, stream()>>>((const T*)x, v, (T*)y, N, C); });
  KERNEL_CHECK();
}

void columnDot(const void* a, int aDt, const void* b, int bDt, int64_t N, int64_t C, float* out) {
  if (C == 0) return;
  int64_t rowsPerChunk = 64;
  int chunks = (int)std::max<int64_t>(1, (N + rowsPerChunk - 1) / rowsPerChunk);
  if (chunks > 4096) { chunks = 4096; rowsPerChunk = (N + chunks - 1) / chunks; }
  Scratch part((size_t)chunks * C * sizeof(float));
  dim3 grid((unsigned)((C + 255) / 256), chunks);
  DISPATCH_FLOAT(aDt, A, DISPATCH_FLOAT(bDt, B, {
    columnDotPartK<A, B><<<grid, 256, 0, stream()>>>((const A*)a, (const B*)b, N, C, rowsPerChunk, part.as<float>());
  }));
  KERNEL_CHECK();
  columnDotSumK<<<(unsigned)((C + 255) / 256), 256, 0, stream()>>>(part.as<float>(), chunks, C, out);
  KERNEL_CHECK();
}

}  // namespace dq
