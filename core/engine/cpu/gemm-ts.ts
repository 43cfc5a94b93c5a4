// Pure TypeScript matrix kernels: the fallback when the native addon is absent (and the reference it is
// compared against). C = alpha · op(A) · op(B) + beta · C over strided float32 views.
//
// Layout trick: every product is computed as dot products of ROWS of A' = op(A) [M, K] and rows of
// Bt = op(B)ᵀ [Nn, K], so the inner loop runs over k on contiguous memory. Operands that are not already
// row-contiguous that way are packed into grow-only scratch buffers (O(MK + NK) copies vs O(MNK) work).
// A 4×4 block of outputs keeps 16 accumulators in registers (JS doubles: the K-sum is done in float64 and
// rounded once into float32, in a fixed k order, so the result is deterministic).

/** Grow-only scratch buffers so the hot loops allocate nothing after warm-up. */
export class Scratch {
  private bufs = new Map<string, Float32Array>();
  get(name: string, n: number): Float32Array {
    let b = this.bufs.get(name);
    if (!b || b.length < n) {
      b = new Float32Array(Math.max(n, Math.ceil((b?.length ?? 0) * 1.5)));
      this.bufs.set(name, b);
    }
    return b;
  }
}

/** Output columns processed per pass so the corresponding Bt rows (JB·K floats) stay in cache. */
const JB = 64;

/**
 * C[cOff + i·ldc + j] = alpha · Σ_k A'(i,k) · B'(k,j) + beta · C[...]   for i < M, j < Nn.
 * A'(i,k) = a[aOff + i·lda + k] (or a[aOff + k·lda + i] when transA); B'(k,j) = b[bOff + k·ldb + j]
 * (or b[bOff + j·ldb + k] when transB). beta = 0 ignores C's old contents (even NaN).
 */
export function gemmTs(
  transA: boolean, transB: boolean, M: number, Nn: number, K: number, alpha: number,
  a: Float32Array, aOff: number, lda: number,
  b: Float32Array, bOff: number, ldb: number,
  beta: number, c: Float32Array, cOff: number, ldc: number,
  scratch: Scratch,
): void {
  if (M === 0 || Nn === 0) return;
  // A rows: [M, K] with row stride ar.
  let A = a, ao = aOff, ar = lda;
  if (transA) {
    A = scratch.get('gemmA', M * K); ao = 0; ar = K;
    for (let k = 0; k < K; k++) {
      const src = aOff + k * lda;
      for (let i = 0; i < M; i++) A[i * K + k] = a[src + i];
    }
  }
  // Bt rows: [Nn, K] with row stride br.
  let Bt = b, bo = bOff, br = ldb;
  if (!transB) {
    Bt = scratch.get('gemmB', Nn * K); bo = 0; br = K;
    for (let k = 0; k < K; k++) {
      const src = bOff + k * ldb;
      for (let j = 0; j < Nn; j++) Bt[j * K + k] = b[src + j];
    }
  }
  const M4 = M - (M % 4);
  for (let j0 = 0; j0 < Nn; j0 += JB) {
    const j1 = Math.min(Nn, j0 + JB);
    const j4 = j0 + ((j1 - j0) - ((j1 - j0) % 4));
    for (let i = 0; i < M4; i += 4) {
      const a0 = ao + i * ar, a1 = a0 + ar, a2 = a1 + ar, a3 = a2 + ar;
      let j = j0;
      for (; j < j4; j += 4) {
        const b0 = bo + j * br, b1 = b0 + br, b2 = b1 + br, b3 = b2 + br;
        let c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
        let c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
        for (let k = 0; k < K; k++) {
          const x0 = A[a0 + k], x1 = A[a1 + k], x2 = A[a2 + k], x3 = A[a3 + k];
          const y0 = Bt[b0 + k], y1 = Bt[b1 + k], y2 = Bt[b2 + k], y3 = Bt[b3 + k];
          c00 += x0 * y0; c01 += x0 * y1; c02 += x0 * y2; c03 += x0 * y3;
          c10 += x1 * y0; c11 += x1 * y1; c12 += x1 * y2; c13 += x1 * y3;
          c20 += x2 * y0; c21 += x2 * y1; c22 += x2 * y2; c23 += x2 * y3;
          c30 += x3 * y0; c31 += x3 * y1; c32 += x3 * y2; c33 += x3 * y3;
        }
        const o0 = cOff + i * ldc + j, o1 = o0 + ldc, o2 = o1 + ldc, o3 = o2 + ldc;
        if (beta === 0) {
          c[o0] = alpha * c00; c[o0 + 1] = alpha * c01; c[o0 + 2] = alpha * c02; c[o0 + 3] = alpha * c03;
          c[o1] = alpha * c10; c[o1 + 1] = alpha * c11; c[o1 + 2] = alpha * c12; c[o1 + 3] = alpha * c13;
          c[o2] = alpha * c20; c[o2 + 1] = alpha * c21; c[o2 + 2] = alpha * c22; c[o2 + 3] = alpha * c23;
          c[o3] = alpha * c30; c[o3 + 1] = alpha * c31; c[o3 + 2] = alpha * c32; c[o3 + 3] = alpha * c33;
        } else {
          c[o0] = alpha * c00 + beta * c[o0]; c[o0 + 1] = alpha * c01 + beta * c[o0 + 1]; c[o0 + 2] = alpha * c02 + beta * c[o0 + 2]; c[o0 + 3] = alpha * c03 + beta * c[o0 + 3];
          c[o1] = alpha * c10 + beta * c[o1]; c[o1 + 1] = alpha * c11 + beta * c[o1 + 1]; c[o1 + 2] = alpha * c12 + beta * c[o1 + 2]; c[o1 + 3] = alpha * c13 + beta * c[o1 + 3];
          c[o2] = alpha * c20 + beta * c[o2]; c[o2 + 1] = alpha * c21 + beta * c[o2 + 1]; c[o2 + 2] = alpha * c22 + beta * c[o2 + 2]; c[o2 + 3] = alpha * c23 + beta * c[o2 + 3];
          c[o3] = alpha * c30 + beta * c[o3]; c[o3 + 1] = alpha * c31 + beta * c[o3 + 1]; c[o3 + 2] = alpha * c32 + beta * c[o3 + 2]; c[o3 + 3] = alpha * c33 + beta * c[o3 + 3];
        }
      }
      for (; j < j1; j++) for (let r = 0; r < 4; r++) dotInto(A, ao + (i + r) * ar, Bt, bo + j * br, K, alpha, beta, c, cOff + (i + r) * ldc + j);
    }
    for (let i = M4; i < M; i++) {
      for (let j = j0; j < j1; j++) dotInto(A, ao + i * ar, Bt, bo + j * br, K, alpha, beta, c, cOff + i * ldc + j);
    }
  }
}

function dotInto(A: Float32Array, ai: number, Bt: Float32Array, bj: number, K: number, alpha: number, beta: number, c: Float32Array, o: number): void {
  let s = 0;
  for (let k = 0; k < K; k++) s += A[ai + k] * Bt[bj + k];
  c[o] = beta === 0 ? alpha * s : alpha * s + beta * c[o];
}
