// DoRA in one linear (core/engine/dora.ts + QLoraLinear), against a float64 reference written straight from PEFT
// 0.21's DoraLinearLayer: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row (norm detached), y = base(x) + (g − 1)⊙(xd·Wᵀ) +
// g⊙s·(xd·Aᵀ·Bᵀ), g = m / ‖·‖. Output, dx, dA, dB and d magnitude within 1e-5 (float32 vs float64), on a dense and
// on an NF4 base (W = the dequantized weight, as PEFT on bitsandbytes), with and without LoRA dropout. The
// model-level check against PEFT itself is test/model/dora-golden.test.ts.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createCpuBackend, cpuData } from '../../core/engine/cpu.ts';
import { loadCpuNative } from '../../core/engine/cpu/native.ts';
import { LoraParams, QLoraLinear, type BaseWeight } from '../../core/engine/lora.ts';
import { DoraMagnitude, rowNormsSq } from '../../core/engine/dora.ts';
import { quantizeNf4 } from '../../core/engine/nf4.ts';
import { mixKey } from '../../common/rng.ts';
import { rand, relErr } from './helpers.ts';

const N = 5, IN = 70, OUT = 6, R = 3, ALPHA = 6, S = ALPHA / R;

for (const native of loadCpuNative() ? [false, true] : [false]) {
  for (const base of ['dense', 'nf4'] as const) {
    for (const p of [0, 0.3]) {
      describe(`DoRA linear (${native ? 'native' : 'TS'} kernels, ${base} base, dropout ${p})`, () => {
        const be = createCpuBackend({ native });
        const w = rand(OUT * IN, 1, -0.3, 0.3), bias = rand(OUT, 2), x = rand(N * IN, 3), dy = rand(N * OUT, 4);
        const weight: BaseWeight = base === 'dense' ? be.upload(w, [OUT, IN]) : be.uploadNf4(quantizeNf4(w, [OUT, IN], { blocksize: 64, doubleQuant: true }));
        const W = base === 'dense' ? w : cpuData(be.dequantize(weight as Parameters<typeof be.dequantize>[0]));
        const A = rand(R * IN, 5, -0.2, 0.2), B = rand(OUT * R, 6, -0.2, 0.2);
        const m0 = Float32Array.from(rowNormsSq(W, OUT, IN), (v, o) => Math.sqrt(v) * (1 + 0.1 * Math.sin(o + 1)));
        const lora = new LoraParams(be, 'model.layers.0.self_attn.q_proj', IN, OUT, { r: R, alpha: ALPHA, dropout: p, useRslora: false }, be.upload(A, [R, IN]), be.upload(B, [OUT, R]));
        lora.magnitude = new DoraMagnitude(be, be.upload(m0, [OUT]), rowNormsSq(W, OUT, IN));
        const lin = new QLoraLinear(be, lora.name, weight, be.upload(bias, [OUT]), lora);
        const key = { p: 0, k0: mixKey(1), k1: mixKey(2), stream: 3, rowSample: Int32Array.from({ length: N }, (_, i) => i), rowPos: new Int32Array(N) };
        const dk = p > 0 ? key : undefined;
        const { y, saved } = lin.forward(be.upload(x, [N, IN]), dk, true);
        const dx = lin.backward(be.upload(dy, [N, OUT]), saved, dk);
        // the dropout mask, from the backend's own op on ones (its bits are tested in cpu-ops)
        const mask = p > 0 ? cpuData(be.dropout(be.upload(new Float32Array(N * IN).fill(1), [N, IN]), { ...key, p })) : new Float32Array(N * IN).fill(1);

        // float64 reference
        const xd = Float64Array.from(x, (v, i) => v * mask[i]);
        const BA = new Float64Array(OUT * IN);
        for (let o = 0; o < OUT; o++) for (let i = 0; i < IN; i++) { let t = 0; for (let k = 0; k < R; k++) t += B[o * R + k] * A[k * IN + i]; BA[o * IN + i] = t; }
        const g = new Float64Array(OUT), norm = new Float64Array(OUT);
        for (let o = 0; o < OUT; o++) { let t = 0; for (let i = 0; i < IN; i++) { const v = W[o * IN + i] + S * BA[o * IN + i]; t += v * v; } norm[o] = Math.sqrt(t); g[o] = m0[o] / norm[o]; }
        const lin64 = (v: ArrayLike<number>, M: ArrayLike<number>, n: number, o: number): number => { let t = 0; for (let i = 0; i < IN; i++) t += v[n * IN + i] * M[o * IN + i]; return t; };
        const yRef = new Float64Array(N * OUT), pre = new Float64Array(N * OUT);
        for (let n = 0; n < N; n++) for (let o = 0; o < OUT; o++) {
          pre[n * OUT + o] = lin64(xd, W, n, o) + S * lin64(xd, BA, n, o);
          yRef[n * OUT + o] = lin64(x, W, n, o) + bias[o] + (g[o] - 1) * lin64(xd, W, n, o) + g[o] * S * lin64(xd, BA, n, o);
        }
        const dm = new Float64Array(OUT), dA = new Float64Array(R * IN), dB = new Float64Array(OUT * R), dxRef = new Float64Array(N * IN);
        for (let n = 0; n < N; n++) {
          const u = new Float64Array(R);
          for (let k = 0; k < R; k++) for (let i = 0; i < IN; i++) u[k] += A[k * IN + i] * xd[n * IN + i];
          const du = new Float64Array(R);
          for (let o = 0; o < OUT; o++) {
            const d = dy[n * OUT + o], dg = d * g[o];
            dm[o] += d * pre[n * OUT + o] / norm[o];
            for (let k = 0; k < R; k++) { dB[o * R + k] += S * dg * u[k]; du[k] += S * dg * B[o * R + k]; }
            for (let i = 0; i < IN; i++) {
              dxRef[n * IN + i] += d * W[o * IN + i] + (dg - d) * W[o * IN + i] * mask[n * IN + i];
            }
          }
          for (let k = 0; k < R; k++) for (let i = 0; i < IN; i++) { dA[k * IN + i] += du[k] * xd[n * IN + i]; dxRef[n * IN + i] += du[k] * A[k * IN + i] * mask[n * IN + i]; }
        }
        const check = (what: string, got: Float32Array, want: Float64Array): void => {
          const e = relErr(got, want);
          assert.ok(e < 1e-5, `${what}: ${e}`);
        };
        it('forward equals PEFT\'s DoRA formula', () => check('y', cpuData(y), yRef));
        it('dx, dA, dB and the magnitude gradient (norm detached) agree', () => {
          check('dx', cpuData(dx), dxRef);
          check('dA', cpuData(lora.dA), dA);
          check('dB', cpuData(lora.dB), dB);
          check('d magnitude', cpuData(lora.magnitude!.dm), dm);
        });
        it('the magnitude trains with B\'s learning-rate scale (LoRA+ group B)', () => {
          lora.lrScaleB = 16;
          assert.deepEqual(lora.trainable().map((t) => t.lrScale), [1, 16, 16]);
        });
      });
    }
  }
}
