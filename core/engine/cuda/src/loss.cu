// Cross-entropy over the vocabulary: one block per row streams the row in chunks of blockDim with an online
// log-sum-exp (running max and rescaled sum per thread, merged across the block), so no [N, V] f32 copy is made.
#include "ops.h"

#include <cmath>
#include <vector>

namespace dq {

struct MaxSum { float m; float s; };

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// rowLoss[n] = lse − x[target] (f64; 0 on ignored rows), rowValid[n] = 1/0/−1 (counted / ignored / bad target).
template <class T, class G>
__global__ void crossEntropyK(const T* x, const int32_t* __restrict__ targets, int64_t V, bool wantGrad, float gradScale,
                              G* dl, double* rowLoss, int* rowValid) {
  __shared__ MaxSum sh[32];
  __shared__ float lseShared;
  int64_t row = blockIdx.x;
  const T* xr = x + row * V;
  int32_t t = targets[row];
  bool ignored = t == -100;
  bool bad = !ignored && (t < 0 || t >= V);
  MaxSum acc{-INFINITY, 0.f};
  if (!ignored && !bad) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      float v = ld(xr, j);
      if (v > acc.m) { acc.s = acc.s * expf(acc.m - v) + 1.f; acc.m = v; }
      else acc.s += expf(v - acc.m);
    }
    for (int o = 16; o > 0; o >>= 1) {
      MaxSum other{__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)};
      acc = merge(acc, other);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      MaxSum tot = sh[0];
      for (int w = 1; w < (int)(blockDim.x >> 5); w++) tot = merge(tot, sh[w]);
      float lse = tot.m + logf(tot.s);
      lseShared = lse;
      rowLoss[row] = (double)lse - (double)ld(xr, t);
    }
    __syncthreads();
  } else if (threadIdx.x == 0) {
    rowLoss[row] = 0;
  }
  if (threadIdx.x == 0) rowValid[row] = bad ? -1 : ignored ? 0 : 1;
  if (!wantGrad) return;
  G* dr = dl + row * V;
  if (ignored || bad) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) st(dr, j, 0.f);
    return;
  }
  float lse = lseShared;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float p = expf(ld(xr, j) - lse);
    st(dr, j, (p - (j == t ? 1.f : 0.f)) * gradScale);
  }
}

CeResult crossEntropy(const void* logits, int dt, const int32_t* targets, int64_t N, int64_t V, bool wantGrad,
                      float gradScale, void* dlogits, int dDt) {
  CeResult r{0, 0, 0};
  if (N == 0) return r;
  REQUIRE(N <= 0x7fffffff, "crossEntropy: too many rows");
  REQUIRE(!wantGrad || dlogits, "crossEntropy: gradient requested without an output");
  Scratch rowLoss((size_t)N * sizeof(double)), rowValid((size_t)N * sizeof(int));
  DISPATCH_FLOAT(dt, T, DISPATCH_FLOAT(wantGrad ? dDt : dt, G, {
    crossEntropyK<T, G><<<(unsigned)N, 512, 0, stream()>>>((const T*)logits, targets, V, wantGrad, gradScale,
                                                           (G*)dlogits, rowLoss.as<double>(), rowValid.as<int>());
  }));
  KERNEL_CHECK();
  std::vector<double> loss((size_t)N);
  std::vector<int> valid((size_t)N);
  CUDA_CHECK(cudaMemcpyAsync(loss.data(), rowLoss.p, N * sizeof(double), cudaMemcpyDeviceToHost, stream()));
  CUDA_CHECK(cudaMemcpyAsync(valid.data(), rowValid.p, N * sizeof(int), cudaMemcpyDeviceToHost, stream()));
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  for (int64_t i = 0; i < N; i++) {  // fixed order: deterministic sum
    if (valid[i] == 1) { r.lossSum += loss[i]; r.count++; }
    else if (valid[i] < 0) r.badTargets++;
  }
  return r;
}

}  // namespace dq
