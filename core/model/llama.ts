// The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a pipeline stage: embeddings? + layers [a, b) + head?,
// forward and backward, written once against `Backend`. A single-process run is the stage that holds everything.
//
// Legend: B sequences, T time, N = B·T tokens, H hidden, I intermediate, V vocab, Hq/Hk heads, D head dim.
// One decoder layer (pre-norm):
//   y1 = rmsnorm(x) ; q,k,v = QLoraLinear(y1) ; q,k = rope(q,k) ; a = attn(q,k,v) ; x2 = x + o_proj(a)
//   y2 = rmsnorm(x2) ; h = silu(gate(y2)) · up(y2) ; out = x2 + down(h)
// Gradient checkpointing (default): only each layer's input is kept; backward recomputes the layer forward.
import type { Backend, DropoutKey, QuantizedTensor, Tensor } from '../engine/backend.ts';
import { LoraParams, freeSaved, type QLoraLinear, type LoraHyper, type LoraLinearSaved } from '../engine/lora.ts';
import type { ModelConfig } from './config.ts';
import { ropeInvFreq } from './config.ts';
import { neftuneNoise, neftuneMagnitude } from './neftune.ts';
import { ShapeError, ConfigError, UnsupportedError } from '../../common/errors.ts';

export const ATTN_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj'] as const;
export const MLP_MODULES = ['gate_proj', 'up_proj', 'down_proj'] as const;
export const LINEAR_MODULES = [...ATTN_MODULES, ...MLP_MODULES] as const;
export type LinearModule = (typeof LINEAR_MODULES)[number];

/** HF module path of a decoder linear, e.g. `model.layers.3.self_attn.q_proj`. */
export function modulePath(layer: number, mod: LinearModule): string {
  return `model.layers.${layer}.${(ATTN_MODULES as readonly string[]).includes(mod) ? 'self_attn' : 'mlp'}.${mod}`;
}

/** Which part of the model a stage holds. A single process holds [0, L) with embedding and head. */
export interface StageSpec {
  readonly firstLayer: number;
  readonly lastLayer: number; // exclusive
  readonly hasEmbedding: boolean;
  readonly hasHead: boolean;
}

export function fullModelSpec(cfg: ModelConfig): StageSpec {
  return { firstLayer: 0, lastLayer: cfg.numLayers, hasEmbedding: true, hasHead: true };
}

export type { LoraConfig } from '../../common/peft.ts';
import type { LoraConfig } from '../../common/peft.ts';

/** PEFT's per-model default targets (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, spec §7). */
export function defaultTargetModules(modelType: string): string[] {
  switch (modelType) {
    case 'llama': case 'mistral': case 'qwen2': return ['q_proj', 'v_proj'];
    case 'chatglm': return ['query_key_value'];
    default: throw new ConfigError(`no default LoRA target_modules for model_type '${modelType}'`, { hint: 'set lora.target_modules explicitly' });
  }
}

/** Does PEFT target the module at `path` (e.g. model.layers.0.self_attn.q_proj)? */
export function isTargeted(path: string, targets: readonly string[] | 'all-linear'): boolean {
  if (targets === 'all-linear') return true;
  return targets.some((t) => path === t || path.endsWith('.' + t));
}

/** rank_pattern / alpha_pattern: keys are regex-free suffix matches like PEFT's (`layers.0.self_attn.q_proj` or `q_proj`). */
export function hyperFor(path: string, lc: LoraConfig): LoraHyper {
  const pick = (pat: Readonly<Record<string, number>> | undefined, dflt: number): number => {
    if (!pat) return dflt;
    for (const [k, v] of Object.entries(pat)) if (path === k || path.endsWith('.' + k) || new RegExp(`(^|\\.)${k}$`).test(path)) return v;
    return dflt;
  };
  return { r: pick(lc.rankPattern, lc.r), alpha: pick(lc.alphaPattern, lc.alpha), dropout: lc.dropout, useRslora: lc.useRslora };
}

/** Frozen + trainable tensors of one decoder layer. */
export interface LayerWeights {
  readonly inputNorm: Tensor;   // [H]
  readonly postNorm: Tensor;    // [H]
  readonly linears: Record<LinearModule, QLoraLinear>;
}

/** Everything a stage holds on its device. */
export interface StageWeights {
  readonly embed?: Tensor;      // [V, H] (first stage; also last stage when tied)
  readonly layers: LayerWeights[];
  readonly finalNorm?: Tensor;  // [H]
  readonly lmHead?: Tensor;     // [V, H] (the embedding table when tied)
}

/** The host-side inputs of one micro-batch. Arrays are row-major [B, T]. */
export interface StageBatch {
  readonly B: number;
  readonly T: number;
  /** Token ids (first stage). */
  readonly ids?: Int32Array;
  /** 1 for real tokens, 0 for padding. */
  readonly keyMask: Int32Array;
  /** Position ids (0-based within each sequence). */
  readonly positions: Int32Array;
  /** Shifted targets (last stage): targets[b, t] is the label of position t+1, −100 = ignored. */
  readonly targets?: Int32Array;
  /** Global sample id of each sequence [B] (keys the dropout masks). */
  readonly sampleIds: Int32Array;
  /**
   * Sample packing (core/train/batch.ts): per token, the example's segment within its row (1, 2, … ; 0 on padding).
   * Attention is then block-diagonal: a token sees only earlier tokens of its own example. Absent = one example per row.
   */
  readonly segments?: Int32Array;
  /** Sample packing: per token, the global sample id of its example (keys dropout masks as if unpacked). */
  readonly tokenSampleIds?: Int32Array;
}

export interface ForwardOptions {
  /** Keep what backward needs. */
  readonly train: boolean;
  /** Dropout key words (seed, step); undefined = no dropout (eval, generation). */
  readonly dropout?: { readonly k0: number; readonly k1: number };
  /** Last stage, training: the gradient scale of the summed token losses (1 / label tokens in the whole optimizer step). */
  readonly gradScale?: number;
}

export interface ForwardResult {
  /** Hidden states for the next stage [N, H] (not on the last stage). Owned by the caller. */
  readonly hidden?: Tensor;
  /** Last stage: sum of token losses and number of label tokens in this micro-batch. */
  readonly lossSum?: number;
  readonly count?: number;
}

interface LayerTape {
  y1: Tensor; rstd1: Tensor;
  q: Tensor; k: Tensor; v: Tensor;           // after rope (q, k) — [N, H*, D]
  att: { out: Tensor; lse: Tensor };
  x2: Tensor; y2: Tensor; rstd2: Tensor;
  g: Tensor; u: Tensor; h: Tensor;
  saved: Partial<Record<LinearModule, LoraLinearSaved>>;
}

/** Saved per micro-batch between forward and backward. */
interface MicroBatchState {
  batch: StageBatch;
  keyMask: Tensor; positions: Tensor;
  dropout?: { k0: number; k1: number };
  /** Input of each layer [N, H] (checkpointing) — index i is the input of layer firstLayer + i; the last entry is the stage output. */
  inputs: Tensor[];
  /** Full tapes when checkpointing is off. */
  tapes?: (LayerTape | undefined)[];
  /** Last stage: gradient w.r.t. the output of the last layer [N, H], computed during forward. */
  dOut?: Tensor;
}

/** How a stage runs (set at load time, the same on every worker). */
export interface StageOptions {
  readonly gradientCheckpointing: boolean;
  /** Rows of logits per head chunk (default: sized per backend). */
  readonly headChunkRows?: number;
  /** NEFTune noise on the embedding output in training (training.neftune_noise_alpha; see neftune.ts). 0/absent = off. */
  readonly neftuneAlpha?: number;
}

export class LlamaStage {
  private readonly states = new Map<number, MicroBatchState>();
  private readonly invFreq: Tensor;
  private readonly mscale: number;
  readonly headDim: number;

  constructor(
    readonly be: Backend,
    readonly cfg: ModelConfig,
    readonly spec: StageSpec,
    readonly weights: StageWeights,
    readonly opts: StageOptions = { gradientCheckpointing: true },
  ) {
    this.headDim = cfg.headDim;
    const rope = ropeInvFreq(cfg);
    this.invFreq = be.upload(rope.invFreq, [rope.invFreq.length], 'f32');
    this.mscale = rope.mscale;
    if (spec.hasEmbedding && !weights.embed) throw new ShapeError('stage holds the embedding but no embedding table was loaded');
    if (spec.hasHead && (!weights.finalNorm || !weights.lmHead)) throw new ShapeError('stage holds the head but final norm / lm_head were not loaded');
    if (weights.layers.length !== spec.lastLayer - spec.firstLayer) throw new ShapeError(`stage expects ${spec.lastLayer - spec.firstLayer} layers, got ${weights.layers.length}`);
  }

  /**
   * Dropout stream of the module at index m (q, k, v, o, gate, up, down = 0..6): the parts of a packed checkpoint
   * module share its first part's stream, so they see one mask — PEFT applies one dropout to the packed input.
   */
  private dropoutStream(L: Record<LinearModule, QLoraLinear>, m: number): number {
    const path = L[LINEAR_MODULES[m]].loraPath;
    return LINEAR_MODULES.findIndex((x) => L[x].loraPath === path);
  }

  /** Every LoRA module of this stage, in a fixed order (layer, then module). */
  loraParams(): LoraParams[] {
    return this.weights.layers.flatMap((_, i) => this.layerLoraParams(i));
  }

  /** The LoRA modules of this stage's layer i (0-based within the stage), in module order. */
  layerLoraParams(i: number): LoraParams[] {
    const out = new Set<LoraParams>();   // parts of a packed module share one LoraParams
    for (const m of LINEAR_MODULES) { const p = this.weights.layers[i].linears[m].lora; if (p) out.add(p); }
    return [...out];
  }

  // ---------------------------------------------------------------------------------------------------
  // forward

  /**
   * Runs the stage on one micro-batch. `id` names the micro-batch for the matching backward.
   * First stage: `batch.ids` is embedded. Other stages: `hidden` [N, H] comes from the previous stage
   * (ownership passes to the stage). Last stage: returns the loss sum; with opts.gradScale it also computes the
   * head gradient right away (so backward needs no logits).
   */
  /** Sequences longer than a sliding window would need windowed attention, which is not implemented: refuse them. */
  private checkWindow(T: number): void {
    const w = this.cfg.slidingWindow;
    if (w !== null && T > w) {
      throw new UnsupportedError(`sequence length ${T} exceeds the model's sliding_window ${w}; sliding-window attention is not implemented`, { hint: `keep data.max_length (and prompt + max_new_tokens) ≤ ${w}` });
    }
  }

  forward(id: number, batch: StageBatch, hidden: Tensor | undefined, opts: ForwardOptions): ForwardResult {
    const be = this.be, { B, T } = batch, N = B * T, H = this.cfg.hiddenSize;
    this.checkWindow(T);
    if (this.states.has(id)) throw new ShapeError(`micro-batch ${id} is already in flight on this stage`);
    let x: Tensor;
    if (this.spec.hasEmbedding) {
      if (!batch.ids) throw new ShapeError('first stage needs token ids');
      const ids = be.upload(batch.ids, [N], 'i32');
      x = be.embedding(ids, this.weights.embed!);
      be.free(ids);
      if (opts.train && this.opts.neftuneAlpha) this.addNeftuneNoise(x, batch, opts);
    } else {
      if (!hidden) throw new ShapeError('this stage needs hidden states from the previous stage');
      if (hidden.shape[0] !== N || hidden.shape[1] !== H) throw new ShapeError(`hidden states of shape [${hidden.shape}] do not match the micro-batch [${N}, ${H}]`);
      x = hidden;
    }
    const keyMask = be.upload(attentionMask(batch), [B, T], 'i32');
    const positions = be.upload(batch.positions, [N], 'i32');
    const st: MicroBatchState = { batch, keyMask, positions, dropout: opts.train ? opts.dropout : undefined, inputs: [] };
    if (!this.opts.gradientCheckpointing && opts.train) st.tapes = [];
    const dropoutRows = st.dropout ? rowKeys(batch) : undefined;

    for (let i = 0; i < this.weights.layers.length; i++) {
      const keepTape = opts.train && !this.opts.gradientCheckpointing;
      const { out, tape } = this.layerForward(i, x, st, dropoutRows, keepTape);
      if (opts.train) { st.inputs.push(x); if (st.tapes) st.tapes.push(tape); }
      else be.free(x);
      x = out;
    }

    if (!this.spec.hasHead) {
      if (opts.train) this.states.set(id, st); else this.freeState(st);
      return { hidden: x };
    }
    // Head: final norm, logits in row chunks (never the whole [N, V] at once), cross-entropy.
    const { lossSum, count, dOut } = this.headForward(x, batch, opts.train ? opts.gradScale : undefined);
    if (opts.train) { st.inputs.push(x); st.dOut = dOut; this.states.set(id, st); }
    else { be.free(x); this.freeState(st); }
    return { lossSum, count };
  }

  /** x [N, H] += NEFTune noise of this micro-batch (training only; keyed like the dropout masks). */
  private addNeftuneNoise(x: Tensor, batch: StageBatch, opts: ForwardOptions): void {
    if (!opts.dropout) throw new ShapeError('NEFTune needs the step\'s RNG key: pass ForwardOptions.dropout in training');
    const H = this.cfg.hiddenSize, rows = rowKeys(batch);
    const noise = neftuneNoise(rows.sample, rows.pos, H, neftuneMagnitude(this.opts.neftuneAlpha!, batch.T, H), opts.dropout);
    const t = this.be.upload(noise, [batch.B * batch.T, H], 'act');
    this.be.axpy(x, t);
    this.be.free(t);
  }

  /**
   * Logits for selected rows (generation): runs the stage without saving and returns [rows.length, V] on the host.
   * `hidden` as in forward. Only for a stage that holds the head.
   */
  logitsAt(batch: StageBatch, hidden: Tensor | undefined, rowsWanted: number[]): Float32Array[] {
    const be = this.be, { B, T } = batch, N = B * T;
    this.checkWindow(T);
    let x: Tensor;
    if (this.spec.hasEmbedding) {
      const ids = be.upload(batch.ids!, [N], 'i32'); x = be.embedding(ids, this.weights.embed!); be.free(ids);
    } else x = hidden!;
    const keyMask = be.upload(attentionMask(batch), [B, T], 'i32');
    const positions = be.upload(batch.positions, [N], 'i32');
    const st: MicroBatchState = { batch, keyMask, positions, inputs: [] };
    for (let i = 0; i < this.weights.layers.length; i++) {
      const { out } = this.layerForward(i, x, st, undefined, false);
      be.free(x); x = out;
    }
    const out: Float32Array[] = [];
    for (const r of rowsWanted) {
      const row = be.rows(x, r, r + 1);
      const { y, rstd } = be.rmsnorm(row, this.weights.finalNorm!, this.cfg.rmsNormEps);
      const logits = be.matmul(y, this.weights.lmHead!, { transB: true });
      out.push(be.download(logits) as Float32Array);
      be.free(y); be.free(rstd); be.free(logits);
    }
    be.free(x); this.freeState(st);
    return out;
  }

  private headForward(x: Tensor, batch: StageBatch, gradScale: number | undefined): { lossSum: number; count: number; dOut?: Tensor } {
    const be = this.be, N = batch.B * batch.T, H = this.cfg.hiddenSize;
    if (!batch.targets) throw new ShapeError('last stage needs targets');
    const targets = be.upload(batch.targets, [N], 'i32');
    const { y, rstd } = be.rmsnorm(x, this.weights.finalNorm!, this.cfg.rmsNormEps);
    const dY = gradScale !== undefined ? be.zeros([N, H], 'act') : undefined;
    const chunk = this.opts.headChunkRows ?? be.logitsChunkRows(this.cfg.vocabSize);
    let lossSum = 0, count = 0;
    for (let r0 = 0; r0 < N; r0 += chunk) {
      const r1 = Math.min(N, r0 + chunk);
      const yc = be.rows(y, r0, r1), tc = be.rows(targets, r0, r1);
      const logits = be.matmul(yc, this.weights.lmHead!, { transB: true });        // [c, V]
      const ce = be.crossEntropy(logits, tc, gradScale !== undefined ? { gradScale, inPlace: true } : {});
      lossSum += ce.lossSum; count += ce.count;
      if (dY && ce.count > 0) be.matmul(ce.dlogits ?? logits, this.weights.lmHead!, { out: be.rows(dY, r0, r1) }); // [c, H]
      if (ce.dlogits && ce.dlogits !== logits) be.free(ce.dlogits);
      be.free(logits);
    }
    be.free(targets);
    let dOut: Tensor | undefined;
    if (dY) { dOut = be.rmsnormBackward(dY, x, this.weights.finalNorm!, rstd); be.free(dY); }
    be.free(y); be.free(rstd);
    return { lossSum, count, dOut };
  }

  private layerForward(i: number, x: Tensor, st: MicroBatchState, rows: { sample: Int32Array; pos: Int32Array } | undefined, keep: boolean): { out: Tensor; tape?: LayerTape } {
    const be = this.be, cfg = this.cfg, lw = this.weights.layers[i], layer = this.spec.firstLayer + i;
    const { B, T } = st.batch, N = B * T, D = this.headDim;
    const dk = (m: number): DropoutKey | undefined => (st.dropout && rows ? { p: 0, k0: st.dropout.k0, k1: st.dropout.k1, stream: layer * 16 + this.dropoutStream(L, m), rowSample: rows.sample, rowPos: rows.pos } : undefined);
    const L = lw.linears;
    const { y: y1, rstd: rstd1 } = be.rmsnorm(x, lw.inputNorm, cfg.rmsNormEps);
    const saved: Partial<Record<LinearModule, LoraLinearSaved>> = {};
    const lin = (m: LinearModule, idx: number, inp: Tensor): Tensor => {
      const r = L[m].forward(inp, dk(idx), keep);
      if (r.saved) saved[m] = r.saved;
      return r.y;
    };
    const q0 = lin('q_proj', 0, y1), k0 = lin('k_proj', 1, y1), v0 = lin('v_proj', 2, y1);
    const ropeOpts = { rotaryDim: this.cfg.rotaryDim, mscale: this.mscale };
    const q = be.rope(be.reshape(q0, [N, cfg.numHeads, D]), st.positions, this.invFreq, ropeOpts);
    const k = be.rope(be.reshape(k0, [N, cfg.numKvHeads, D]), st.positions, this.invFreq, ropeOpts);
    be.free(q0); be.free(k0);
    const v = be.reshape(v0, [B, T, cfg.numKvHeads, D]);
    const att = be.attention(be.reshape(q, [B, T, cfg.numHeads, D]), be.reshape(k, [B, T, cfg.numKvHeads, D]), v, st.keyMask, 1 / Math.sqrt(D));
    const o = lin('o_proj', 3, be.reshape(att.out, [N, cfg.numHeads * D]));
    const x2 = be.axpy(o, x);                               // x2 = o + x (reuses o's buffer)
    const { y: y2, rstd: rstd2 } = be.rmsnorm(x2, lw.postNorm, cfg.rmsNormEps);
    const g = lin('gate_proj', 4, y2), u = lin('up_proj', 5, y2);
    const h = be.swiglu(g, u);
    const d = lin('down_proj', 6, h);
    const out = be.axpy(d, x2);                             // out = d + x2
    if (keep) return { out, tape: { y1, rstd1, q, k, v, att, x2, y2, rstd2, g, u, h, saved } };
    for (const t of [y1, rstd1, q, k, v, att.out, att.lse, x2, y2, rstd2, g, u, h]) be.free(t);
    return { out };
  }

  // ---------------------------------------------------------------------------------------------------
  // backward

  /**
   * Backward of micro-batch `id`. Last stage: uses the head gradient computed in forward (dHidden must be
   * undefined). Other stages: dHidden [N, H] is the gradient of this stage's output. Accumulates LoRA
   * gradients and returns the gradient of the stage input (undefined on the first stage). Frees the state.
   * `onLayerDone(i)` runs right after layer i's LoRA gradients got this micro-batch's share (layers go last to
   * first): on the last micro-batch of a step they are final there, and their all-reduce can start.
   */
  backward(id: number, dHidden?: Tensor, onLayerDone?: (layer: number) => void): Tensor | undefined {
    const be = this.be;
    const st = this.states.get(id);
    if (!st) throw new ShapeError(`no forward state for micro-batch ${id} on this stage (stale or duplicated backward?)`);
    this.states.delete(id);
    let dx: Tensor;
    if (this.spec.hasHead) {
      if (!st.dOut) throw new ShapeError(`micro-batch ${id}: forward ran without gradScale, cannot backward`);
      dx = st.dOut;
      be.free(st.inputs.pop()!);   // the stage output (kept only for the head) is not needed any more
    } else {
      if (!dHidden) throw new ShapeError('this stage needs the gradient of its output');
      dx = dHidden;
    }
    const rows = st.dropout ? rowKeys(st.batch) : undefined;
    for (let i = this.weights.layers.length - 1; i >= 0; i--) {
      const x = st.inputs[i];
      let tape = st.tapes?.[i];
      if (!tape) {
        const re = this.layerForward(i, x, st, rows, true);   // checkpointing: recompute the layer
        be.free(re.out);
        tape = re.tape!;
      }
      const next = this.layerBackward(i, dx, x, tape, st, rows);
      be.free(dx);
      be.free(x);
      dx = next;
      onLayerDone?.(i);
    }
    this.freeState(st);
    if (this.spec.hasEmbedding) { be.free(dx); return undefined; }
    return dx;
  }

  private layerBackward(i: number, dOut: Tensor, x: Tensor, tp: LayerTape, st: MicroBatchState, rows: { sample: Int32Array; pos: Int32Array } | undefined): Tensor {
    const be = this.be, cfg = this.cfg, lw = this.weights.layers[i], L = lw.linears, layer = this.spec.firstLayer + i;
    const { B, T } = st.batch, N = B * T, D = this.headDim;
    const dk = (m: number): DropoutKey | undefined => (st.dropout && rows ? { p: 0, k0: st.dropout.k0, k1: st.dropout.k1, stream: layer * 16 + this.dropoutStream(L, m), rowSample: rows.sample, rowPos: rows.pos } : undefined);
    // out = x2 + down(h)
    const dh = L.down_proj.backward(dOut, tp.saved.down_proj, dk(6));
    const { dgate, dup } = be.swigluBackward(dh, tp.g, tp.u);
    be.free(dh);
    const dy2 = L.gate_proj.backward(dgate, tp.saved.gate_proj, dk(4));
    const dy2b = L.up_proj.backward(dup, tp.saved.up_proj, dk(5));
    be.axpy(dy2, dy2b); be.free(dy2b); be.free(dgate); be.free(dup);
    const dx2 = be.rmsnormBackward(dy2, tp.x2, lw.postNorm, tp.rstd2);
    be.free(dy2);
    be.axpy(dx2, dOut);                                   // residual
    // x2 = x + o_proj(att)
    const datt = L.o_proj.backward(dx2, tp.saved.o_proj, dk(3));
    const { dq, dk: dkk, dv } = be.attentionBackward(
      be.reshape(datt, [B, T, cfg.numHeads, D]),
      be.reshape(tp.q, [B, T, cfg.numHeads, D]), be.reshape(tp.k, [B, T, cfg.numKvHeads, D]),
      be.reshape(tp.v, [B, T, cfg.numKvHeads, D]), st.keyMask, tp.att, 1 / Math.sqrt(D));
    be.free(datt);
    const ropeInv = { rotaryDim: this.cfg.rotaryDim, mscale: this.mscale, inverse: true };
    const dq0 = be.rope(be.reshape(dq, [N, cfg.numHeads, D]), st.positions, this.invFreq, ropeInv);
    const dk0 = be.rope(be.reshape(dkk, [N, cfg.numKvHeads, D]), st.positions, this.invFreq, ropeInv);
    be.free(dq); be.free(dkk);
    const dy1 = L.q_proj.backward(be.reshape(dq0, [N, cfg.numHeads * D]), tp.saved.q_proj, dk(0));
    const dy1k = L.k_proj.backward(be.reshape(dk0, [N, cfg.numKvHeads * D]), tp.saved.k_proj, dk(1));
    const dy1v = L.v_proj.backward(be.reshape(dv, [N, cfg.numKvHeads * D]), tp.saved.v_proj, dk(2));
    be.axpy(dy1, dy1k); be.axpy(dy1, dy1v);
    be.free(dy1k); be.free(dy1v); be.free(dq0); be.free(dk0); be.free(dv);
    const dx = be.rmsnormBackward(dy1, x, lw.inputNorm, tp.rstd1);
    be.free(dy1);
    be.axpy(dx, dx2);                                     // residual
    be.free(dx2);
    // LoRA saved tensors were freed by QLoraLinear.backward; the layer's own intermediates go now.
    for (const t of [tp.y1, tp.rstd1, tp.q, tp.k, tp.v, tp.att.out, tp.att.lse, tp.x2, tp.y2, tp.rstd2, tp.g, tp.u, tp.h]) be.free(t);
    return dx;
  }

  private freeState(st: MicroBatchState): void {
    this.be.free(st.keyMask); this.be.free(st.positions);
  }

  /**
   * Drops every in-flight micro-batch (after a failed step): the saved layer inputs, and the full tapes when
   * checkpointing is off. (A micro-batch whose backward was cut short is no longer in flight: what it held is for the
   * caller's Backend.trackAllocations to give back.)
   */
  reset(): void {
    for (const st of this.states.values()) {
      for (const t of st.inputs) this.be.free(t);
      if (st.dOut) this.be.free(st.dOut);
      for (const tp of st.tapes ?? []) {
        if (!tp) continue;
        for (const s of Object.values(tp.saved)) freeSaved(this.be, s);
        for (const t of [tp.y1, tp.rstd1, tp.q, tp.k, tp.v, tp.att.out, tp.att.lse, tp.x2, tp.y2, tp.rstd2, tp.g, tp.u, tp.h]) this.be.free(t);
      }
      this.freeState(st);
    }
    this.states.clear();
  }

  /** Number of micro-batches waiting for backward (1F1B bookkeeping). */
  get inFlight(): number { return this.states.size; }

  // ---------------------------------------------------------------------------------------------------
  // generation with a KV cache (needs Backend.attentionCached)

  /** Whether this stage's backend can decode with a KV cache. */
  get canDecodeCached(): boolean { return typeof this.be.attentionCached === 'function'; }

  /** A zeroed cache of `capacity` positions for B sequences: per layer k, v [B·capacity, Hk·D]. */
  createKvCache(B: number, capacity: number): KvCache {
    const w = this.cfg.numKvHeads * this.headDim;
    const L = this.weights.layers.length;
    return {
      B, capacity,
      k: Array.from({ length: L }, () => this.be.zeros([B * capacity, w], 'act')),
      v: Array.from({ length: L }, () => this.be.zeros([B * capacity, w], 'act')),
    };
  }

  freeKvCache(c: KvCache): void {
    for (const t of [...c.k, ...c.v]) this.be.free(t);
  }

  /**
   * Runs T new tokens of each of B sequences whose cache indices are [start, start + T) (the same for every
   * sequence: prompts are left-padded). `keyMask` [B, capacity] marks real tokens written so far, these included;
   * `positions` [B·T] are the RoPE positions. First stage: `batch.ids`; other stages: `hidden` [B·T, H] (owned).
   * Returns hidden states for the next stage, or (last stage) the logits of each sequence's last new token.
   */
  decode(cache: KvCache, start: number, batch: { B: number; T: number; ids?: Int32Array; positions: Int32Array; keyMask: Int32Array }, hidden?: Tensor): { hidden?: Tensor; logits?: Float32Array[] } {
    const be = this.be, { B, T } = batch, N = B * T, D = this.headDim, cfg = this.cfg;
    if (!be.attentionCached) throw new ShapeError(`the ${be.name} backend has no cached attention`);
    if (start + T > cache.capacity) throw new ShapeError(`KV cache overflow: ${start + T} positions > capacity ${cache.capacity}`);
    this.checkWindow(cache.capacity);
    let x: Tensor;
    if (this.spec.hasEmbedding) {
      const ids = be.upload(batch.ids!, [N], 'i32'); x = be.embedding(ids, this.weights.embed!); be.free(ids);
    } else x = hidden!;
    const positions = be.upload(batch.positions, [N], 'i32');
    const keyMask = be.upload(batch.keyMask, [B, cache.capacity], 'i32');
    const qp = new Int32Array(N);
    for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) qp[b * T + t] = start + t;
    const queryPos = be.upload(qp, [N], 'i32');
    const ropeOpts = { rotaryDim: this.cfg.rotaryDim, mscale: this.mscale };
    for (let i = 0; i < this.weights.layers.length; i++) {
      const lw = this.weights.layers[i], L = lw.linears;
      const { y: y1, rstd: r1 } = be.rmsnorm(x, lw.inputNorm, cfg.rmsNormEps);
      const q0 = L.q_proj.forward(y1, undefined, false).y, k0 = L.k_proj.forward(y1, undefined, false).y, v0 = L.v_proj.forward(y1, undefined, false).y;
      be.free(y1); be.free(r1);
      const q = be.rope(be.reshape(q0, [N, cfg.numHeads, D]), positions, this.invFreq, ropeOpts);
      const k = be.rope(be.reshape(k0, [N, cfg.numKvHeads, D]), positions, this.invFreq, ropeOpts);
      be.free(q0); be.free(k0);
      const kRows = be.reshape(k, [N, cfg.numKvHeads * D]);
      for (let b = 0; b < B; b++) {
        // Each cache slot is written once and starts at zero, so adding is copying.
        be.axpy(be.rows(cache.k[i], b * cache.capacity + start, b * cache.capacity + start + T), be.rows(kRows, b * T, (b + 1) * T));
        be.axpy(be.rows(cache.v[i], b * cache.capacity + start, b * cache.capacity + start + T), be.rows(v0, b * T, (b + 1) * T));
      }
      be.free(k); be.free(v0);
      const att = be.attentionCached(be.reshape(q, [B, T, cfg.numHeads, D]),
        be.reshape(cache.k[i], [B, cache.capacity, cfg.numKvHeads, D]), be.reshape(cache.v[i], [B, cache.capacity, cfg.numKvHeads, D]),
        keyMask, queryPos, 1 / Math.sqrt(D));
      be.free(q);
      const x2 = be.axpy(L.o_proj.forward(be.reshape(att, [N, cfg.numHeads * D]), undefined, false).y, x);
      be.free(att); be.free(x);
      const { y: y2, rstd: r2 } = be.rmsnorm(x2, lw.postNorm, cfg.rmsNormEps);
      const g = L.gate_proj.forward(y2, undefined, false).y, u = L.up_proj.forward(y2, undefined, false).y;
      be.free(y2); be.free(r2);
      const h = be.swiglu(g, u);
      be.free(g); be.free(u);
      x = be.axpy(L.down_proj.forward(h, undefined, false).y, x2);
      be.free(h); be.free(x2);
    }
    be.free(positions); be.free(keyMask); be.free(queryPos);
    if (!this.spec.hasHead) return { hidden: x };
    const logits: Float32Array[] = [];
    for (let b = 0; b < B; b++) {
      const row = be.rows(x, b * T + T - 1, b * T + T);
      const { y, rstd } = be.rmsnorm(row, this.weights.finalNorm!, cfg.rmsNormEps);
      const l = be.matmul(y, this.weights.lmHead!, { transB: true });
      logits.push(be.download(l) as Float32Array);
      be.free(y); be.free(rstd); be.free(l);
    }
    be.free(x);
    return { logits };
  }
}

/** Per-layer key/value cache of one stage for B sequences. */
export interface KvCache {
  readonly B: number;
  readonly capacity: number;
  readonly k: Tensor[];   // per layer [B·capacity, Hk·D]
  readonly v: Tensor[];
}

/**
 * Per-row (token) dropout counter words: the sequence's global sample id and the token position. A packed token uses
 * its own example's id and its position inside that example, so it draws the mask it would draw unpacked.
 */
function rowKeys(b: StageBatch): { sample: Int32Array; pos: Int32Array } {
  const N = b.B * b.T;
  if (b.tokenSampleIds) return { sample: b.tokenSampleIds, pos: b.positions };
  const sample = new Int32Array(N), pos = new Int32Array(N);
  for (let s = 0; s < b.B; s++) for (let t = 0; t < b.T; t++) { sample[s * b.T + t] = b.sampleIds[s]; pos[s * b.T + t] = t; }
  return { sample, pos };
}

/** What the attention kernels get as keyMask: segment labels for a packed batch (block-diagonal), else 0/1. */
function attentionMask(b: StageBatch): Int32Array {
  if (!b.segments) return b.keyMask;
  if (b.segments.length !== b.B * b.T) throw new ShapeError(`packed batch: segments has ${b.segments.length} entries, expected B·T = ${b.B * b.T}`);
  return b.segments;
}

export type { QuantizedTensor };
