// LoRA as PEFT does it (qlora-spec §5): a frozen base linear (NF4 here) plus a trainable low-rank branch
//   y = base(x) + scale · B · A · dropout(x),   A [r, in] ~ U(±1/√in), B [out, r] = 0, scale = α/r (α/√r with rsLoRA).
// Dropout applies to the LoRA input only; the base path sees the undropped x. LoRA weights, their gradients
// and Adam state are float32 on every backend.
import type { Backend, DropoutKey, QuantizedTensor, Tensor } from './backend.ts';
import { CounterRng, mixKey } from '../../common/rng.ts';
import { ShapeError } from '../../common/errors.ts';
import { DoraMagnitude, doraColumnScale } from './dora.ts';

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
  /**
   * LoRA+ (lora.loraplus_lr_ratio): the optimizer gives B (and, as PEFT's create_loraplus_optimizer does, every 1-D
   * trainable tensor of the module, i.e. a DoRA magnitude) the learning rate lr × lrScaleB; A keeps lr. 1 = plain LoRA.
   */
  lrScaleB = 1;
  /** DoRA (lora.use_dora): the per-output magnitude (PEFT's lora_magnitude_vector); undefined = plain LoRA. */
  magnitude?: DoraMagnitude;

  constructor(
    private readonly be: Backend,
    /** HF module path, e.g. `model.layers.3.self_attn.q_proj`. */
    readonly name: string,
    readonly inFeatures: number,
    readonly outFeatures: number,
    readonly hyper: LoraHyper,
    readonly A: Tensor,   // [r, in]
    readonly B: Tensor,   // [out, r]
    /**
     * Internal row i of B (and of its gradient and moments) holds external row rowPerm[i] — the row order of the
     * checkpoint / PEFT file. Set for modules whose base weight rows the loader permuted (ChatGLM's interleaved
     * RoPE); undefined = identity.
     */
    readonly rowPerm?: Int32Array,
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
  static init(be: Backend, name: string, inFeatures: number, outFeatures: number, hyper: LoraHyper, seed: number, rowPerm?: Int32Array): LoraParams {
    const a = new Float32Array(hyper.r * inFeatures);
    const rng = new CounterRng(mixKey(seed, 0x4c6f5241), mixKey(...Array.from(name, (c) => c.charCodeAt(0))));
    const bound = 1 / Math.sqrt(inFeatures);
    for (let i = 0; i < a.length; i++) a[i] = (rng.next() * 2 - 1) * bound;
    return new LoraParams(be, name, inFeatures, outFeatures, hyper,
      be.upload(a, [hyper.r, inFeatures], 'f32'), be.zeros([outFeatures, hyper.r], 'f32'), rowPerm);
  }

  /** Host copies in the external (PEFT / checkpoint) row order: A, B and, with moments, the AdamW state. */
  hostState(withMoments: boolean): LoraHostState {
    const be = this.be, f = (t: Tensor): Float32Array => be.download(t) as Float32Array;
    const ext = (t: Tensor): Float32Array => permuteRows(f(t), this.r, this.rowPerm, 'toExternal');
    const st: LoraHostState = { A: f(this.A), B: ext(this.B) };
    if (withMoments) Object.assign(st, { mA: f(this.mA), vA: f(this.vA), mB: ext(this.mB), vB: ext(this.vB) });
    const g = this.magnitude;
    if (g) {
      st.magnitude = f(g.m);
      if (withMoments) Object.assign(st, { mMag: f(g.mm), vMag: f(g.vm) });
    }
    return st;
  }

  /** Overwrites weights (and moments, when given) from host arrays in the external row order. */
  setHostState(s: LoraHostState): void {
    const put = (dst: Tensor, src: Float32Array | undefined, rows: boolean): void => {
      if (!src) return;
      if (src.length !== dst.size) throw new ShapeError(`${this.name}: state of ${src.length} values for a tensor of ${dst.size}`);
      const t = this.be.upload(rows ? permuteRows(src, this.r, this.rowPerm, 'toInternal') : src, dst.shape, 'f32');
      this.be.scale(dst, 0);
      this.be.axpy(dst, t, 1);
      this.be.free(t);
    };
    put(this.A, s.A, false); put(this.B, s.B, true);
    put(this.mA, s.mA, false); put(this.vA, s.vA, false); put(this.mB, s.mB, true); put(this.vB, s.vB, true);
    const g = this.magnitude;
    if (g) { put(g.m, s.magnitude, false); put(g.mm, s.mMag, false); put(g.vm, s.vMag, false); }
    else if (s.magnitude) throw new ShapeError(`${this.name}: state has a DoRA magnitude, but the module is plain LoRA`, { hint: 'set lora.use_dora to match the checkpoint / adapter' });
  }

  get r(): number { return this.hyper.r; }

  zeroGrad(): void {
    this.be.scale(this.dA, 0); this.be.scale(this.dB, 0);
    if (this.magnitude) this.be.scale(this.magnitude.dm, 0);
  }

  tensors(): Tensor[] {
    return [this.A, this.B, this.dA, this.dB, this.mA, this.vA, this.mB, this.vB, ...(this.magnitude?.tensors() ?? [])];
  }

  /**
   * Every trainable tensor of the module with its gradient, AdamW moments and learning-rate scale — what the step
   * math iterates over for the gradient norm, clipping and AdamW: A (lr), B (lr × lrScaleB) and, with DoRA, the
   * magnitude (lr × lrScaleB: a 1-D tensor, LoRA+'s "group B" in PEFT's create_loraplus_optimizer).
   */
  trainable(): { readonly param: Tensor; readonly grad: Tensor; readonly m: Tensor; readonly v: Tensor; readonly lrScale: number }[] {
    const t = [
      { param: this.A, grad: this.dA, m: this.mA, v: this.vA, lrScale: 1 },
      { param: this.B, grad: this.dB, m: this.mB, v: this.vB, lrScale: this.lrScaleB },
    ];
    const g = this.magnitude;
    if (g) t.push({ param: g.m, grad: g.dm, m: g.mm, v: g.vm, lrScale: this.lrScaleB });
    return t;
  }

  free(): void {
    for (const t of this.tensors()) this.be.free(t);
  }
}

export interface LoraHostState {
  A: Float32Array; B: Float32Array;
  mA?: Float32Array; vA?: Float32Array; mB?: Float32Array; vB?: Float32Array;
  /** DoRA magnitude [out] and its AdamW moments. */
  magnitude?: Float32Array; mMag?: Float32Array; vMag?: Float32Array;
}

/** Reorders the rows of a row-major [rows, cols] array between the internal and the external order. */
export function permuteRows(data: Float32Array, cols: number, perm: Int32Array | undefined, dir: 'toInternal' | 'toExternal'): Float32Array {
  if (!perm) return data;
  const out = new Float32Array(data.length);
  for (let i = 0; i < perm.length; i++) {
    const [from, to] = dir === 'toInternal' ? [perm[i], i] : [i, perm[i]];
    out.set(data.subarray(from * cols, (from + 1) * cols), to * cols);
  }
  return out;
}

/** What a LoRA-linear forward keeps for its backward. */
export interface LoraLinearSaved {
  /** The LoRA branch input after dropout [N, in] (the layer input itself when p = 0: not owned). */
  readonly xd: Tensor;
  readonly ownsXd: boolean;
  /** A · xd [N, r]. */
  readonly u: Tensor;
  /** DoRA: pre = xd·Wᵀ + s·u·Bᵀ [N, out], g = m/‖W + sBA‖ and 1/‖W + sBA‖ [out] (see dora.ts). */
  readonly dora?: { readonly pre: Tensor; readonly g: Tensor; readonly invNorm: Tensor };
}

/**
 * The frozen base weight of a linear: NF4 (QLoRA) or, with `quantization: none`, a full-precision 'act' tensor
 * [out, in] (LoRA on a bf16/fp32 base, as PEFT without bitsandbytes).
 */
export type BaseWeight = QuantizedTensor | Tensor;

/** Whether a base weight is a dense tensor (Tensors carry a dtype; quantized weights do not). */
export function isDenseWeight(w: BaseWeight): w is Tensor {
  return 'dtype' in w;
}

/**
 * A frozen NF4 (or dense) linear (with optional bias) and its optional LoRA branch. Packed checkpoint modules (ChatGLM's
 * query_key_value, dense_h_to_4h) become several QLoraLinears that share one LoraParams: each uses the rows
 * `loraRows` of B — exactly the packed module's LoRA, with its single A and one dropout mask (same stream).
 */
export class QLoraLinear {
  constructor(
    private readonly be: Backend,
    readonly name: string,
    readonly weight: BaseWeight,
    readonly bias: Tensor | undefined,
    public lora: LoraParams | undefined,
    /** The checkpoint module this linear's LoRA belongs to (differs from `name` for parts of a packed module). */
    readonly loraPath: string = name,
    /** Rows [start, end) of the module's LoRA B that produce this linear's outputs; undefined = all. */
    readonly loraRows?: { readonly start: number; readonly end: number; readonly total: number },
    /** The packed module's B row permutation (see LoraParams.rowPerm), shared by its parts. */
    readonly loraRowPerm?: Int32Array,
  ) {}

  private loraB(l: LoraParams): Tensor { return this.loraRows ? this.be.rows(l.B, this.loraRows.start, this.loraRows.end) : l.B; }
  private loraDB(l: LoraParams): Tensor { return this.loraRows ? this.be.rows(l.dB, this.loraRows.start, this.loraRows.end) : l.dB; }

  /** y = x·Wᵀ (+ b) of the frozen base. */
  baseForward(x: Tensor): Tensor {
    return isDenseWeight(this.weight) ? this.be.denseLinear(x, this.weight, this.bias) : this.be.nf4Linear(x, this.weight, this.bias);
  }

  /** x·Wᵀ of the frozen base, without bias. */
  baseNoBias(x: Tensor): Tensor {
    return isDenseWeight(this.weight) ? this.be.denseLinear(x, this.weight) : this.be.nf4Linear(x, this.weight);
  }

  /** dx = dy·W of the frozen base. */
  baseBackward(dy: Tensor): Tensor {
    return isDenseWeight(this.weight) ? this.be.denseLinearBackward(dy, this.weight) : this.be.nf4LinearBackward(dy, this.weight);
  }

  /** DoRA's per-output scale g = m / ‖W + s·B·A‖_row (and 1/‖·‖) for the current A, B, m. */
  private doraScale(lora: LoraParams): { g: Tensor; invNorm: Tensor } {
    const wat = this.baseNoBias(lora.A);                                             // [r, out] = (W·Aᵀ)ᵀ
    try { return doraColumnScale(this.be, lora.magnitude!, wat, lora.A, lora.B, lora.scale); } finally { this.be.free(wat); }
  }

  /**
   * DoRA backward (norm detached): dm += Σ_n dy ⊙ pre / ‖·‖ ; dyg = dy ⊙ g ; dB += s·dygᵀ·u ; du = s·dyg·B ;
   * dA += duᵀ·xd ; dx = dy·W + dropoutᵀ((dyg − dy)·W + du·A).
   */
  private doraBackward(dy: Tensor, dx: Tensor, lora: LoraParams, saved: LoraLinearSaved, d: NonNullable<LoraLinearSaved['dora']>, dropout: DropoutKey | undefined): Tensor {
    const be = this.be, mag = lora.magnitude!, out = this.outFeatures;
    const cd = be.columnDot(dy, d.pre);                                               // [out]
    const dmag = be.scaleColumns(be.reshape(cd, [1, out]), d.invNorm);
    be.axpy(mag.dm, dmag);
    be.free(dmag); be.free(cd);
    const dyg = be.scaleColumns(dy, d.g);                                             // [N, out]
    be.matmul(dyg, saved.u, { transA: true, alpha: lora.scale, out: lora.dB, accumulate: true });
    const du = be.matmul(dyg, lora.B, { alpha: lora.scale });                         // [N, r]
    be.matmul(du, saved.xd, { transA: true, out: lora.dA, accumulate: true });
    be.axpy(dyg, dy, -1);                                                             // dyg − dy
    const dxd = this.baseBackward(dyg);                                               // [N, in]
    be.free(dyg);
    be.matmul(du, lora.A, { out: dxd, accumulate: true });
    if (saved.ownsXd && dropout) {
      const dxm = be.dropout(dxd, { ...dropout, p: lora.hyper.dropout });
      be.axpy(dx, dxm); be.free(dxm);
    } else be.axpy(dx, dxd);
    be.free(dxd); be.free(du);
    freeSaved(be, saved);
    return dx;
  }

  get inFeatures(): number { return this.weight.shape[1]; }
  get outFeatures(): number { return this.weight.shape[0]; }

  /** y = x·deq(W)ᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ.   x [N, in] → y [N, out]. */
  forward(x: Tensor, dropout: DropoutKey | undefined, save: boolean): { y: Tensor; saved?: LoraLinearSaved } {
    const be = this.be;
    const y = this.baseForward(x);
    const lora = this.lora;
    if (!lora) return { y };
    const useDropout = dropout !== undefined && lora.hyper.dropout > 0;
    const xd = useDropout ? be.dropout(x, { ...dropout, p: lora.hyper.dropout }) : x;
    const u = be.matmul(xd, lora.A, { transB: true });                               // [N, r]
    if (lora.magnitude) {
      // DoRA: y += g ⊙ (xd·Wᵀ + s·u·Bᵀ) − xd·Wᵀ
      const { g, invNorm } = this.doraScale(lora);
      const bnb = this.baseNoBias(xd);                                               // [N, out]
      const pre = be.zeros(bnb.shape, bnb.dtype);
      be.axpy(pre, bnb);
      be.matmul(u, lora.B, { transB: true, alpha: lora.scale, out: pre, accumulate: true });
      const scaled = be.scaleColumns(pre, g);
      be.axpy(y, scaled); be.axpy(y, bnb, -1);
      be.free(scaled); be.free(bnb);
      if (save) return { y, saved: { xd, ownsXd: useDropout, u, dora: { pre, g, invNorm } } };
      be.free(pre); be.free(g); be.free(invNorm); be.free(u);
      if (useDropout) be.free(xd);
      return { y };
    }
    be.matmul(u, this.loraB(lora), { transB: true, alpha: lora.scale, out: y, accumulate: true }); // y += s·u·Bᵀ
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
    const dx = this.baseBackward(dy);
    const lora = this.lora;
    if (!lora || !saved) return dx;
    if (saved.dora) return this.doraBackward(dy, dx, lora, saved, saved.dora, dropout);
    be.matmul(dy, saved.u, { transA: true, alpha: lora.scale, out: this.loraDB(lora), accumulate: true });
    const du = be.matmul(dy, this.loraB(lora), { alpha: lora.scale });                // [N, r]
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
  if (s.dora) { be.free(s.dora.pre); be.free(s.dora.g); be.free(s.dora.invNorm); }
}
