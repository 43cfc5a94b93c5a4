// Matrix products through cuBLASLt, loaded at run time with dlopen.
//
// Why dlopen and our own declarations instead of <cublasLt.h> + -lcublasLt: the developer machines and CI have
// nvcc and the CUDA runtime but no cuBLAS (headers or library), and the addon must still build there (it is
// loaded by the tests, which skip without a GPU). The few declarations below are the stable cuBLASLt C ABI
// (cublasLt.h of CUDA 12 and 13; the enum values are checked against the header in the comments); a machine
// with a GPU has libcublasLt.so from the CUDA toolkit or the nvidia-cublas wheel.
#include "common.h"

#include <dlfcn.h>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace dq {
namespace {

typedef int cublasStatus_t;                  // CUBLAS_STATUS_SUCCESS = 0
typedef struct cublasLtContext* cublasLtHandle_t;
typedef void* cublasLtMatmulDesc_t;
typedef void* cublasLtMatrixLayout_t;
typedef void* cublasLtMatmulPreference_t;
struct cublasLtMatmulAlgo_t { uint64_t data[8]; };
struct cublasLtMatmulHeuristicResult_t {     // sizeof 96: algo @0, workspaceSize @64, state @72, wavesCount @76
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};
static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96, "cuBLASLt heuristic result layout");

constexpr int CUBLAS_COMPUTE_32F = 68;            // cublasComputeType_t
constexpr int CUDA_R_32F_ = 0, CUDA_R_16BF_ = 14; // cudaDataType_t (library_types.h)
constexpr int CUBLAS_OP_N = 0, CUBLAS_OP_T = 1;
constexpr int CUBLASLT_MATMUL_DESC_TRANSA = 3, CUBLASLT_MATMUL_DESC_TRANSB = 4;
constexpr int CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1;

struct Lt {
  cublasStatus_t (*create)(cublasLtHandle_t*);
  const char* (*statusString)(cublasStatus_t);
  size_t (*getVersion)();
  cublasStatus_t (*descCreate)(cublasLtMatmulDesc_t*, int computeType, int scaleType);
  cublasStatus_t (*descDestroy)(cublasLtMatmulDesc_t);
  cublasStatus_t (*descSetAttr)(cublasLtMatmulDesc_t, int attr, const void* buf, size_t size);
  cublasStatus_t (*layoutCreate)(cublasLtMatrixLayout_t*, int type, uint64_t rows, uint64_t cols, int64_t ld);
  cublasStatus_t (*layoutDestroy)(cublasLtMatrixLayout_t);
  cublasStatus_t (*prefCreate)(cublasLtMatmulPreference_t*);
  cublasStatus_t (*prefDestroy)(cublasLtMatmulPreference_t);
  cublasStatus_t (*prefSetAttr)(cublasLtMatmulPreference_t, int attr, const void* buf, size_t size);
  cublasStatus_t (*heuristic)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatmulPreference_t, int,
                              cublasLtMatmulHeuristicResult_t*, int*);
  cublasStatus_t (*matmul)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void* alpha, const void* A,
                           cublasLtMatrixLayout_t, const void* B, cublasLtMatrixLayout_t, const void* beta,
                           const void* C, cublasLtMatrixLayout_t, void* D, cublasLtMatrixLayout_t,
                           const cublasLtMatmulAlgo_t*, void* workspace, size_t workspaceSize, cudaStream_t);
};

Lt lt;
void* libHandle = nullptr;
cublasLtHandle_t handle = nullptr;
void* workspace = nullptr;
constexpr size_t kWorkspace = size_t(32) << 20;
std::string libPath;

#define LT_CHECK(expr)                                                                              \
  do {                                                                                              \
    cublasStatus_t st_ = (expr);                                                                    \
    if (st_ != 0) {                                                                                 \
      std::string m_ = std::string(#expr) + " failed: cuBLAS status " + std::to_string(st_) + " (" +  \
                       (lt.statusString ? lt.statusString(st_) : "?") + ")";                         \
      /* 3 = CUBLAS_STATUS_ALLOC_FAILED: out of device memory, as a failed cudaMalloc */              \
      if (st_ == 3) throw ::dq::OutOfMemory(m_ + " at gemm.cpp:" + std::to_string(__LINE__), 0);     \
      ::dq::fail(m_, __FILE__, __LINE__);                                                           \
    }                                                                                               \
  } while (0)

template <class F> void sym(F& f, const char* name) {
  void* p = dlsym(libHandle, name);
  if (!p) fail(std::string("libcublasLt has no symbol ") + name, __FILE__, __LINE__);
  f = reinterpret_cast<F>(p);
}

// A layout/descriptor set and its chosen algorithm, cached per problem (shapes repeat every layer and step).
struct Plan {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulAlgo_t algo;
};
std::unordered_map<std::string, Plan> plans;
std::mutex plansMu;

}  // namespace

std::string gemmInit() {
  if (handle) return libPath;
  std::vector<std::string> names;
  if (const char* env = std::getenv("DQLORA_CUBLASLT")) names.push_back(env);
  for (const char* n : {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so", "/usr/local/cuda/lib64/libcublasLt.so.13",
                        "/usr/local/cuda/lib64/libcublasLt.so.12", "/usr/local/cuda/lib64/libcublasLt.so"})
    names.push_back(n);
  std::string tried;
  for (auto& n : names) {
    libHandle = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (libHandle) { libPath = n; break; }
    tried += (tried.empty() ? "" : ", ") + n;
  }
  if (!libHandle)
    fail("cuBLASLt library not found (tried " + tried + "); set DQLORA_CUBLASLT to its path", __FILE__, __LINE__);
  sym(lt.create, "cublasLtCreate");
  sym(lt.statusString, "cublasLtGetStatusString");
  sym(lt.getVersion, "cublasLtGetVersion");
  sym(lt.descCreate, "cublasLtMatmulDescCreate");
  sym(lt.descDestroy, "cublasLtMatmulDescDestroy");
  sym(lt.descSetAttr, "cublasLtMatmulDescSetAttribute");
  sym(lt.layoutCreate, "cublasLtMatrixLayoutCreate");
  sym(lt.layoutDestroy, "cublasLtMatrixLayoutDestroy");
  sym(lt.prefCreate, "cublasLtMatmulPreferenceCreate");
  sym(lt.prefDestroy, "cublasLtMatmulPreferenceDestroy");
  sym(lt.prefSetAttr, "cublasLtMatmulPreferenceSetAttribute");
  sym(lt.heuristic, "cublasLtMatmulAlgoGetHeuristic");
  sym(lt.matmul, "cublasLtMatmul");
  LT_CHECK(lt.create(&handle));
  CUDA_CHECK(cudaMalloc(&workspace, kWorkspace));  // outside the pool: lives as long as the process
  return libPath + " (version " + std::to_string(lt.getVersion()) + ")";
}

/**
 * Row-major D[M, N] = alpha · op(A) · op(B) + beta · D, with A [M, K] (or [K, M] when transA), B [K, N]
 * (or [N, K] when transB). A and B share one dtype (f32 or bf16); D may be f32 or bf16; fp32 accumulation.
 *
 * cuBLASLt is column-major, so we compute Dᵀ[N, M] = op(B)ᵀ · op(A)ᵀ: a row-major [r, c] buffer is a
 * column-major [c, r] matrix with ld = c, which is exactly the transpose we need for free.
 */
void gemm(const void* A, int abDt, const void* B, void* D, int dDt, int64_t M, int64_t N, int64_t K, bool transA,
          bool transB, float alpha, float beta) {
  if (!handle) fail("cuBLASLt is not initialised", __FILE__, __LINE__);
  REQUIRE(abDt == F32 || abDt == BF16, "matmul operands must be f32 or bf16");
  REQUIRE(dDt == F32 || dDt == BF16, "matmul output must be f32 or bf16");
  REQUIRE(!(abDt == F32 && dDt == BF16), "f32 x f32 -> bf16 is not a cuBLASLt combination (use an f32 output)");
  if (M == 0 || N == 0) return;
  const int abType = abDt == F32 ? CUDA_R_32F_ : CUDA_R_16BF_;
  const int dType = dDt == F32 ? CUDA_R_32F_ : CUDA_R_16BF_;
  // Column-major operands of the transposed problem: X = B-memory (first operand), Y = A-memory.
  const uint64_t xr = transB ? K : N, xc = transB ? N : K;
  const uint64_t yr = transA ? M : K, yc = transA ? K : M;
  std::string key = std::to_string(abDt) + "," + std::to_string(dDt) + "," + std::to_string(M) + "," +
                    std::to_string(N) + "," + std::to_string(K) + "," + (transA ? "T" : "N") + (transB ? "T" : "N");
  Plan plan;
  {
    std::lock_guard<std::mutex> lock(plansMu);
    auto it = plans.find(key);
    if (it != plans.end()) {
      plan = it->second;
    } else {
      LT_CHECK(lt.descCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F_));
      int opX = transB ? CUBLAS_OP_T : CUBLAS_OP_N, opY = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
      LT_CHECK(lt.descSetAttr(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opX, sizeof(opX)));
      LT_CHECK(lt.descSetAttr(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opY, sizeof(opY)));
      LT_CHECK(lt.layoutCreate(&plan.la, abType, xr, xc, (int64_t)xr));
      LT_CHECK(lt.layoutCreate(&plan.lb, abType, yr, yc, (int64_t)yr));
      LT_CHECK(lt.layoutCreate(&plan.lc, dType, (uint64_t)N, (uint64_t)M, N));
      cublasLtMatmulPreference_t pref;
      LT_CHECK(lt.prefCreate(&pref));
      size_t ws = kWorkspace;
      LT_CHECK(lt.prefSetAttr(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      cublasLtMatmulHeuristicResult_t res;
      int count = 0;
      std::memset(&res, 0, sizeof(res));
      cublasStatus_t st = lt.heuristic(handle, plan.desc, plan.la, plan.lb, plan.lc, plan.lc, pref, 1, &res, &count);
      lt.prefDestroy(pref);
      if (st != 0 || count == 0)
        fail("cuBLASLt found no algorithm for matmul " + key + " (status " + std::to_string(st) + ")", __FILE__, __LINE__);
      plan.algo = res.algo;
      plans.emplace(key, plan);
    }
  }
  LT_CHECK(lt.matmul(handle, plan.desc, &alpha, B, plan.la, A, plan.lb, &beta, D, plan.lc, D, plan.lc, &plan.algo,
                     workspace, kWorkspace, stream()));
}

}  // namespace dq
