// Host-side launchers of every kernel; each queues work on dq::stream() and checks the launch.
// Shapes in brackets; dt arguments are dtype codes (common.h). All pointers are device pointers.
#pragma once
#include "common.h"
#include <string>

namespace dq {

void initStream();
std::string gemmInit();
void gemm(const void* A, int abDt, const void* B, void* D, int dDt, int64_t M, int64_t N, int64_t K, bool transA,
          bool transB, float alpha, float beta);

// elementwise.cu
void convert(const void* src, int srcDt, void* dst, int dstDt, size_t n);
void axpy(void* a, int aDt, const void* b, int bDt, size_t n, float alpha);   // a += alpha·b
void scale(void* a, int dt, size_t n, float s);
double sumSquares(const void* a, int dt, size_t n);                              // synchronises
void sumRows(const void* x, int dt, int64_t N, int64_t C, float* out);          // [N, C] -> [C] f32
void addBias(void* y, int yDt, const void* bias, int bDt, int64_t N, int64_t C); // y[n, c] += bias[c]
// dora.cu
void scaleColumns(const void* x, void* y, int dt, const float* v, int64_t N, int64_t C);       // y[n, c] = x[n, c]·v[c]
void columnDot(const void* a, int aDt, const void* b, int bDt, int64_t N, int64_t C, float* out); // Σ_n a·b -> [C] f32
void swiglu(const void* g, const void* u, void* h, int dt, size_t n);
void swigluBackward(const void* dh, const void* g, const void* u, void* dg, void* du, int dt, size_t n);
void dropout(const void* x, void* y, int dt, int64_t N, int64_t C, uint32_t threshold24, float scale, uint32_t k0,
             uint32_t k1, uint32_t streamWord, const int32_t* rowSample, const int32_t* rowPos);
void adamw(float* p, const float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps,
           float decay, float stepSize, float bc2Sqrt);
int embedding(const int32_t* ids, const void* table, int tDt, void* out, int oDt, int64_t N, int64_t H, int64_t V);
void rmsnorm(const void* x, int xDt, const void* w, int wDt, void* y, float* rstd, int64_t N, int64_t H, float eps);
void rmsnormBackward(const void* dy, const void* x, int xDt, const void* w, int wDt, const float* rstd, void* dx,
                     int64_t N, int64_t H);
void rope(const void* x, void* y, int dt, const int32_t* pos, const float* invFreq, int64_t N, int64_t nh, int64_t D,
          int64_t rotaryDim, float mscale, bool inverse);

// nf4.cu
struct Nf4Dev {
  const uint8_t* packed;       // [ceil(n/2)]
  const void* absmax;          // f32 [nb] or u8 [nb] (absmaxU8)
  bool absmaxU8;
  const float* nestedAbsmax;   // [ceil(nb / nestedBlocksize)]
  const float* nestedMap;      // [256]
  float offset;
  const float* quantMap;       // [16]
  int64_t n;
  int blocksize;
  int nestedBlocksize;
};
void nf4Dequant(const Nf4Dev& w, void* out, int outDt);
void nf4Quantize(const void* w, int wDt, int64_t n, int blocksize, uint8_t* packed, float* absmax);
void nf4DoubleQuant(const float* absmax, int64_t nb, float offset, const float* map256, int nestedBlocksize,
                    uint8_t* codes, float* nestedAbsmax);

// attention.cu: q [B, T, Hq, D], k/v [B, T, Hk, D] bf16, mask i32 [B, T], out bf16 [B, T, Hq, D], lse f32 [B, Hq, T]
void attentionForward(const void* q, const void* k, const void* v, const int32_t* mask, void* out, float* lse, int B,
                      int T, int Hq, int Hk, int D, float scale);
void attentionBackward(const void* dout, const void* q, const void* k, const void* v, const int32_t* mask,
                       const void* out, const float* lse, void* dq, void* dk, void* dv, int B, int T, int Hq, int Hk,
                       int D, float scale);

// loss.cu: logits [N, V], targets i32 [N]; dlogits may alias logits (in place) or be null.
struct CeResult { double lossSum; int64_t count; int64_t badTargets; };
CeResult crossEntropy(const void* logits, int dt, const int32_t* targets, int64_t N, int64_t V, bool wantGrad,
                      float gradScale, void* dlogits, int dDt);

}  // namespace dq
