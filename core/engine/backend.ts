// The one contract between model code and a device. Model code (core/model/*) is written once against
// `Backend` and never sees which backend runs it. Ops are coarse and fused, each forward next to its backward.
//
// Legend for shape comments:
//   N  tokens in the micro-batch (= B·T, row-major [B, T, ...] flattened)
//   B  sequences, T  time steps, H  hidden size, I  MLP intermediate size, V  vocabulary
//   Hq query heads, Hk key/value heads (GQA: query head h uses kv head h / (Hq/Hk)), D  head dim
//   r  LoRA rank
//
// Conventions:
// - All ops are synchronous from the caller's view (the cuda backend may queue work on a stream and only
//   synchronise in `download`/`sumSquares`/`crossEntropy`, which return host values).
// - Float tensors on the cpu backend are float32. On the cuda backend activations are bf16 and LoRA weights,
//   optimizer state and gradients are f32; the model code does not care (it asks for 'act' tensors).
// - Ops allocate their outputs unless an `out` tensor is passed. Callers `free` what they no longer need
//   (the cpu backend's free is a no-op hint; the cuda backend returns memory to its pool).
// - Weight matrices use the PyTorch nn.Linear convention: W is [out, in] and y = x · Wᵀ.

/** Element types a backend tensor may hold. 'act' in requests means "the backend's activation type". */
export type DType = 'f32' | 'bf16' | 'f16' | 'i32' | 'u8';

/** An opaque device tensor. Backends extend it with their own storage. */
export interface Tensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  /** Number of elements. */
  readonly size: number;
}

/**
 * Host-side NF4 weight with optional double quantization, exactly the bitsandbytes layout (qlora-spec §1–3).
 * Produced by core/engine/nf4.ts (quantizeNf4) or read from a pre-quantized checkpoint.
 */
export interface Nf4Weight {
  /** Logical weight shape [out, in]. */
  readonly shape: readonly [number, number];
  /** Packed codes, two per byte, even flat element in the high nibble; length ceil(out·in / 2). */
  readonly packed: Uint8Array;
  /** Elements per quantization block (64 by default). */
  readonly blocksize: number;
  /** The 16-entry code table (NF4 table of spec §1.1 normally; read from the checkpoint's quant_map). */
  readonly quantMap: Float32Array;
  /** Per-block scale: float32 when not double-quantized, else uint8 codes into nestedQuantMap. */
  readonly absmax: Float32Array | Uint8Array;
  /** Double quantization state, present iff absmax is Uint8Array. */
  readonly nested?: {
    readonly absmax: Float32Array;      // [ceil(nblocks / nestedBlocksize)]
    readonly quantMap: Float32Array;    // [256] signed dynamic map
    readonly blocksize: number;         // 256
    readonly offset: number;            // float32 mean of the original absmax
  };
  /** dtype the weight had before quantization ('bfloat16' | 'float16' | 'float32'), kept for serialization. */
  readonly sourceDtype: 'bfloat16' | 'float16' | 'float32';
}

/** A quantized weight resident on the device (opaque). */
export interface QuantizedTensor {
  readonly shape: readonly [number, number];
  /** Bytes this weight occupies on the device. */
  readonly bytes: number;
}

/** What Backend.trackAllocations returns. */
export interface AllocationTracker {
  /** Frees every tensor allocated since the tracker started that is still live; returns their bytes. */
  freeLeftovers(): number;
  /** Stops recording (the tensors stay as they are). */
  close(): void;
}

/** Saved state of an attention forward, needed by its backward. */
export interface AttentionSaved {
  /** Output [B, T, Hq, D]. */
  readonly out: Tensor;
  /** Log-sum-exp of each softmax row [B, Hq, T] (f32). */
  readonly lse: Tensor;
}

/** Dropout mask address: the mask of element (row, j) is a pure function of these numbers (see rng.ts). */
export interface DropoutKey {
  /** Keep probability is 1 − p. p = 0 means identity. */
  readonly p: number;
  /** Two 32-bit key words (e.g. mixKey(seed), mixKey(step)). */
  readonly k0: number;
  readonly k1: number;
  /** Which LoRA module (layer · 16 + module index): third counter word. */
  readonly stream: number;
  /** Per row: the global sample id (first counter word) [N]. */
  readonly rowSample: Int32Array;
  /** Per row: the token position inside its sample (second counter word, combined with column j) [N]. */
  readonly rowPos: Int32Array;
}

export interface AdamWHyper {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** 1-based optimizer step (for bias correction). */
  readonly step: number;
}

export type SourceDtype = 'bfloat16' | 'float16' | 'float32';

export interface QuantizeNf4Options {
  /** Elements per block: a power of two in 32..4096 (default 64, what transformers always uses). */
  blocksize?: number;
  /** Quantize the absmax vector to 8 bits as well (QLoRA's "double quantization"); default true. */
  doubleQuant?: boolean;
  /** dtype the weight had in the checkpoint (recorded for serialization only); default 'float32'. */
  sourceDtype?: SourceDtype;
  /** The tensor's name, for errors (e.g. model.layers.3.self_attn.q_proj.weight). */
  name?: string;
  /**
   * NaN / ±Infinity in the weight: 'refuse' (default) throws naming the tensor and the first bad index; 'kernel'
   * quantizes them as the bitsandbytes kernel does (NaN → code 0, which dequantizes to −absmax: silently wrong
   * weights), for the bit-exact emulation tests only.
   */
  nonFinite?: 'refuse' | 'kernel';
}

export interface Backend {
  readonly name: 'cpu' | 'cuda';
  /** Activation dtype this backend computes in ('f32' on cpu, 'bf16' on cuda). */
  readonly actDtype: DType;

  // ---- memory -------------------------------------------------------------------------------------
  /**
   * Copies host data to a new device tensor. f32 data may be stored as actDtype when dtype='act'. A Uint16Array is
   * raw bfloat16 bits (common/halfprec), for dtype 'bf16' or 'act' only: stored as is where the tensor is bf16,
   * widened exactly where it is f32 — activations cross between stages this way without a host-side conversion.
   */
  upload(data: Float32Array | Int32Array | Uint8Array | Uint16Array, shape: readonly number[], dtype?: DType | 'act'): Tensor;
  zeros(shape: readonly number[], dtype?: DType | 'act'): Tensor;
  /** Copies a device tensor to the host as float32 (float tensors) or int32 / uint8. */
  download(t: Tensor): Float32Array | Int32Array | Uint8Array;
  /**
   * The same values as `download(t)` at the point of the call, without blocking the JS thread on the device:
   * later ops may be queued (and may overwrite or free t) while the copy is in flight. cuda: a copy stream
   * with pinned staging, ordered after the work already queued; cpu: an already-resolved download.
   */
  downloadAsync(t: Tensor): Promise<Float32Array | Int32Array | Uint8Array>;
  /**
   * As downloadAsync, but a bf16 tensor comes back as its raw bits (Uint16Array: half the bytes, no conversion on
   * either side of the copy); f32 tensors come back as Float32Array. For activations leaving a stage. `alloc`, when
   * given, supplies the host memory (exactly `bytes` bytes, e.g. from a BufferPool; it is overwritten whole).
   */
  downloadActAsync(t: Tensor, alloc?: (bytes: number) => ArrayBuffer): Promise<Float32Array | Uint16Array>;
  /** Releases device memory. Using t afterwards is an error. */
  free(t: Tensor): void;
  /** Same data, new shape (no copy): an alias. Size must match. Free exactly one of the aliases of a storage. */
  reshape(t: Tensor, shape: readonly number[]): Tensor;
  /**
   * A view of rows [start, end) of t (first dimension), sharing storage (no copy): reads see t's data and
   * writes (e.g. matmul `out`) land in t. `free` on a view is a no-op; the view dies with t.
   */
  rows(t: Tensor, start: number, end: number): Tensor;
  /** Bytes of device memory held by live tensors (for the leak checks and metrics). */
  memoryInUse(): number;
  /**
   * The most bytes live tensors may take: the DQLORA_MEM_LIMIT_BYTES budget when set (an allocation beyond it throws
   * OutOfMemoryError, as a full device does), else the device's memory (cuda) or undefined (cpu: host memory is not
   * budgeted). `training.micro_batch_size: auto` probes only where this is defined.
   */
  memoryBudget(): number | undefined;
  /**
   * Starts recording the tensors allocated from now on, so that a sequence of ops cut short by an exception (out of
   * memory in the middle of a step) can give back what it had allocated and not yet freed. One tracker at a time.
   */
  trackAllocations(): AllocationTracker;
  /** Returns memory kept for reuse to the system (cuda: the pool's cached blocks; cpu: the reuse buffers). */
  releaseCache(): void;

  // ---- NF4 ----------------------------------------------------------------------------------------
  /** Moves a host NF4 weight to the device (packed: no full-precision copy is kept). */
  uploadNf4(w: Nf4Weight): QuantizedTensor;
  freeQuantized(q: QuantizedTensor): void;
  /** Full dequantized weight [out, in] in f32 (for merge / tests; not used in training). */
  dequantize(q: QuantizedTensor): Tensor;
  /**
   * NF4 + double quantization of a host weight [out, in], bit-identical to core/engine/nf4.ts quantizeNf4 (same
   * codes, absmax and nested constants): the loader quantizes every decoder linear through this, so a device that
   * can do it faster (cuda) does.
   */
  quantizeNf4(w: Float32Array, shape: readonly [number, number], opts?: QuantizeNf4Options): Nf4Weight;
  /**
   * Rows of the LM head + loss computed per chunk for a vocabulary of `vocabSize`: the memory of the logits vs the
   * efficiency of the head GEMM on this device.
   */
  logitsChunkRows(vocabSize: number): number;

  // ---- linear algebra -------------------------------------------------------------------------------
  /**
   * out = alpha · op(a) · op(b) (+ out when accumulate), op = transpose when the flag is set.
   * a: [M, K] (or [K, M] with transA), b: [K, Nn] (or [Nn, K] with transB), out: [M, Nn].
   */
  matmul(a: Tensor, b: Tensor, opts?: { transA?: boolean; transB?: boolean; alpha?: number; out?: Tensor; accumulate?: boolean }): Tensor;
  /** y = x · deq(W)ᵀ (+ bias).   x [N, in], W [out, in], bias [out] → y [N, out]. */
  nf4Linear(x: Tensor, w: QuantizedTensor, bias?: Tensor): Tensor;
  /** dx = dy · deq(W).   dy [N, out] → dx [N, in]. (No weight gradient: the base is frozen.) */
  nf4LinearBackward(dy: Tensor, w: QuantizedTensor): Tensor;
  /**
   * y = x · Wᵀ (+ bias) for a frozen full-precision base weight (`quantization: none`: LoRA without bitsandbytes).
   * x [N, in], W [out, in] (an 'act' tensor: f32 on cpu, bf16 on cuda), bias [out] → y [N, out].
   */
  denseLinear(x: Tensor, w: Tensor, bias?: Tensor): Tensor;
  /** dx = dy · W.   dy [N, out] → dx [N, in] (the base is frozen: no weight gradient). */
  denseLinearBackward(dy: Tensor, w: Tensor): Tensor;

  // ---- elementwise / reductions ----------------------------------------------------------------------
  /** a += alpha · b (same shape), in place; returns a. */
  axpy(a: Tensor, b: Tensor, alpha?: number): Tensor;
  /** a ·= s in place; returns a. */
  scale(a: Tensor, s: number): Tensor;
  /** Sum of squares of all elements, as a host number (float64 accumulation where possible). */
  sumSquares(t: Tensor): number;
  /** Sum over rows: x [N, C] → [C] (bias gradients). */
  sumRows(x: Tensor): Tensor;
  /** y = x · diag(v): x [N, C], v f32 [C] → y [N, C] (new tensor, x's dtype). DoRA's per-output magnitude scale. */
  scaleColumns(x: Tensor, v: Tensor): Tensor;
  /** out[c] = Σ_n a[n, c] · b[n, c]: a, b [N, C] → f32 [C]. DoRA's magnitude gradient. */
  columnDot(a: Tensor, b: Tensor): Tensor;

  // ---- layers ---------------------------------------------------------------------------------------
  /** table [V, H], ids i32 [N] → [N, H]. Ids outside [0, V) are an error. */
  embedding(ids: Tensor, table: Tensor): Tensor;

  /** y = x / sqrt(mean(x²) + eps) · w.  x [N, H], w [H] → y [N, H], rstd [N] (f32). */
  rmsnorm(x: Tensor, w: Tensor, eps: number): { y: Tensor; rstd: Tensor };
  /** dx for rmsnorm (w frozen).  dy [N, H] → dx [N, H]. */
  rmsnormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor): Tensor;

  /**
   * Rotary embedding, HF "rotate_half" layout (dim i pairs with i + D/2), applied to the first `rotaryDim`
   * dims of each head (D for Llama). x [N, nh, D], pos i32 [N], invFreq f32 [rotaryDim/2] (already scaled
   * per rope_scaling; attention scaling factor folded in as `mscale`). Returns a new tensor.
   * Backward is the rotation by the negative angle: call with inverse = true.
   */
  rope(x: Tensor, pos: Tensor, invFreq: Tensor, opts: { rotaryDim: number; mscale?: number; inverse?: boolean }): Tensor;

  /**
   * Causal self-attention with GQA and key padding. q [B, T, Hq, D], k/v [B, T, Hk, D],
   * keyMask i32 [B, T] (1 = real token, 0 = padding). A query attends to keys at positions ≤ its own that
   * are real tokens; a row with no such key outputs zeros. Softmax in f32.
   */
  attention(q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, scale: number): AttentionSaved;
  attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, saved: AttentionSaved, scale: number): { dq: Tensor; dk: Tensor; dv: Tensor };

  /**
   * Inference attention over a key/value cache (generation). q [B, Tq, Hq, D]; k/v [B, Tk, Hk, D] hold the cache
   * (Tk = its capacity); keyMask i32 [B, Tk] marks filled, real positions; queryPos i32 [B·Tq] gives each query's
   * cache index: it attends to keys at indices ≤ queryPos with keyMask 1 (a query with none outputs zeros).
   * Forward only → out [B, Tq, Hq, D]. Optional: without it, generation recomputes the whole sequence per token.
   */
  attentionCached?(q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, queryPos: Tensor, scale: number): Tensor;

  /** h = silu(gate) · up.  gate/up [N, I] → h [N, I]. */
  swiglu(gate: Tensor, up: Tensor): Tensor;
  swigluBackward(dh: Tensor, gate: Tensor, up: Tensor): { dgate: Tensor; dup: Tensor };

  /**
   * Inverted dropout for the LoRA branch input: y = x · mask / (1 − p), mask from the counter-based RNG
   * addressed by `key` (identical bits on every backend). x [N, C]. Backward = the same op on dy.
   */
  dropout(x: Tensor, key: DropoutKey): Tensor;

  /**
   * Cross-entropy over the vocabulary for each row with target ≠ −100, computed in f32 in chunks.
   * logits [N, V], targets i32 [N]. Returns the SUM of the per-token losses and the count of targets.
   * When gradScale is given, also returns dlogits = (softmax − onehot) · gradScale (0 on ignored rows),
   * written into the logits tensor in place when inPlace is set (saves a [N, V] buffer).
   */
  crossEntropy(logits: Tensor, targets: Tensor, opts?: { gradScale?: number; inPlace?: boolean }): { lossSum: number; count: number; dlogits?: Tensor };

  // ---- optimizer -----------------------------------------------------------------------------------
  /**
   * One AdamW step in place (torch.optim.AdamW semantics: decoupled weight decay applied before the update):
   * p ← p − lr·wd·p; m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²; p ← p − lr · m̂ / (sqrt(v̂) + eps).
   */
  adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, h: AdamWHyper): void;
}
