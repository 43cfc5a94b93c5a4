// LoRA as PEFT does it (qlora-spec §5): a frozen base linear (NF4 here) plus a trainable low-rank branch
//   y = base(x) + scale · B · A · dropout(x),   A [r, in] ~ U(±1/√in), B [out, r] = 0, scale = α/r (α/√r with rsLoRA).
// Dropout applies to the LoRA input only; the base path sees the undropped x. LoRA weights, their gradients
// and Adam state are float32 on every backend.
import type { Backend, DropoutKey, QuantizedTensor, Tensor } from './backend.ts';
import { CounterRng, mixKey } from '../../common/rng.ts';

/** LoRA hyper-parameters of one module (after rank_pattern / alpha_pattern are applied). */
export interface LoraHyper {
  readonly r: number;
  readonly alpha: number;
  readonly dropout: number;
  readonly useRslora: boolean;
}

export function loraScale(h: LoraHyper): number {
  return h.useRslora ? h.alpha / Math.sqrt(h.r) : h.alpha / h.r;
}

/** The trainable part of one adapted linear: weights, accumulated gradients and AdamW moments. */
export class LoraParams {
  readonly scale: number;
  /** Gradients accumulate over the micro-batches of an optimizer step; `zeroGrad` clears them. */
  readonly dA: Tensor;
  readonly dB: Tensor;
  readonly mA: Tensor; readonly vA: Tensor;
  readonly mB: Tensor; readonly vB: Tensor;

  constructor(
    private readonly be: Backend,
    /** HF module path, e.g. `model.layers.3.self_attn.q_proj`. */
    readonly name: string,
    readonly inFeatures: number,
    readonly outFeatures: number,
    readonly hyper: LoraHyper,
    readonly A: Tensor,   // [r, in]
    readonly B: Tensor,   // [out, r]
  ) {
    this.scale = loraScale(hyper);
    this.dA = be.zeros(A.shape, 'f32'); this.dB = be.zeros(B.shape, 'f32');
    this.mA = be.zeros(A.shape, 'f32'); this.vA = be.zeros(A.shape, 'f32');
    this.mB = be.zeros(B.shape, 'f32'); this.vB = be.zeros(B.shape, 'f32');
  }

  /**
   * PEFT default init: A ← kaiming_uniform(a=√5) = U(−1/√in, 1/√in), B ← 0. The numbers come from a counter RNG
   * keyed by (seed, module name), so every worker creates the same adapter whatever the layout.
   */
  static init(be: Backend, name: string, inFeatures: number, outFeatures: number, hyper: LoraHyper, seed: number): LoraParams {
    const a = new Float32Array(hyper.r * inFeatures);
    const rng = new CounterRng(mixKey(seed, 0x4c6f5241), mixKey(...Array.from(name, (c) => c.charCodeAt(0))));
    const bound = 1 / Math.sqrt(inFeatures);
    for (let i = 0; i < a.length; i++) a[i] = (rng.next() * 2 - 1) * bound;
    return new LoraParams(be, name, inFeatures, outFeatures, hyper,
      be.upload(a, [hyper.r, inFeatures], 'f32'), be.zeros([outFeatures, hyper.r], 'f32'));
  }

  zeroGrad(): void {
    this.be.scale(this.dA, 0); this.be.scale(this.dB, 0);
  }

  tensors(): Tensor[] {
    return [this.A, this.B, this.dA, this.dB, this.mA, this.vA, this.mB, this.vB];
  }

  free(): void {
    for (const t of this.tensors()) this.be.free(t);
  }
}

/** What a LoRA-linear forward keeps for its backward. */
export interface LoraLinearSaved {
  /** The LoRA branch input after dropout [N, in] (the layer input itself when p = 0: not owned). */
  readonly xd: Tensor;
  readonly ownsXd: boolean;
  /** A · xd [N, r]. */
  readonly u: Tensor;
}

/** A frozen NF4 linear (with optional bias) and its optional LoRA branch. */
export class QLoraLinear {
  constructor(
    private readonly be: Backend,
    readonly name: string,
    readonly weight: QuantizedTensor,
    readonly bias: Tensor | undefined,
    public lora: LoraParams | undefined,
  ) {}

  get inFeatures(): number { return this.weight.shape[1]; }
  get outFeatures(): number { return this.weight.shape[0]; }

  /** y = x·deq(W)ᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ.   x [N, in] → y [N, out]. */
  forward(x: Tensor, dropout: DropoutKey | undefined, save: boolean): { y: Tensor; saved?: LoraLinearSaved } {
    const be = this.be;
    const y = be.nf4Linear(x, this.weight, this.bias);
    const lora = this.lora;
    if (!lora) return { y };
    const useDropout = dropout !== undefined && lora.hyper.dropout > 0;
    const xd = useDropout ? be.dropout(x, { ...dropout, p: lora.hyper.dropout }) : x;
    const u = be.matmul(xd, lora.A, { transB: true });                               // [N, r]
    be.matmul(u, lora.B, { transB: true, alpha: lora.scale, out: y, accumulate: true }); // y += s·u·Bᵀ
    if (save) return { y, saved: { xd, ownsXd: useDropout, u } };
    be.free(u);
    if (useDropout) be.free(xd);
    return { y };
  }

  /**
   * Given dy [N, out]: accumulates dA, dB into the LoRA params and returns dx [N, in].
   *   dB += s·dyᵀ·u ; du = s·dy·B ; dA += duᵀ·xd ; dx = dy·deq(W) + dropout(du·A)
   */
  backward(dy: Tensor, saved: LoraLinearSaved | undefined, dropout: DropoutKey | undefined): Tensor {
    const be = this.be;
    const dx = be.nf4LinearBackward(dy, this.weight);
    const lora = this.lora;
    if (!lora || !saved) return dx;
    be.matmul(dy, saved.u, { transA: true, alpha: lora.scale, out: lora.dB, accumulate: true });
    const du = be.matmul(dy, lora.B, { alpha: lora.scale });                          // [N, r]
    be.matmul(du, saved.xd, { transA: true, out: lora.dA, accumulate: true });
    if (saved.ownsXd && dropout) {
      const dxd = be.matmul(du, lora.A);                                              // [N, in]
      const dxm = be.dropout(dxd, { ...dropout, p: lora.hyper.dropout });
      be.axpy(dx, dxm);
      be.free(dxd); be.free(dxm);
    } else {
      be.matmul(du, lora.A, { out: dx, accumulate: true });
    }
    be.free(du);
    freeSaved(be, saved);
    return dx;
  }
}

export function freeSaved(be: Backend, s: LoraLinearSaved | undefined): void {
  if (!s) return;
  be.free(s.u);
  if (s.ownsXd) be.free(s.xd);
}
