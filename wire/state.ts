// A stage's trainable state on the wire (proto StageState, sent chunked by PutState): LoRA weights (with DoRA, the
// magnitude vectors) and, for checkpoints, their AdamW moments. Both ends use this module: the worker encodes, the
// coordinator reassembles and decodes into the host types common/checkpoint.ts writes.
import { WireError } from '../common/errors.ts';
import { crc32, decodeTensorAs, f32ToTensor } from './tensor.ts';
import { StageState, type StateChunk } from '../proto/gen/dqlora/v1/control.ts';
import type { Backend } from '../core/engine/backend.ts';
import type { LoraParams } from '../core/engine/lora.ts';
import type { LoraTensors } from '../core/model/adapter.ts';
import type { OptimizerMoments } from '../common/checkpoint.ts';

/** AdamW moments of one module (DoRA: of its magnitude too), as common/checkpoint.ts writes them. */
export type ModuleMoments = OptimizerMoments;

export interface DecodedStageState {
  readonly stage: number;
  readonly modules: LoraTensors[];
  /** Present when the worker was asked for moments. */
  readonly moments?: ModuleMoments[];
}

/** Serializes the stage's LoRA params (in their fixed order) to StageState bytes. */
export function encodeStageState(be: Backend, stage: number, params: readonly LoraParams[], includeMoments: boolean): Uint8Array {
  void be; // host copies come from LoraParams.hostState (external row order)
  return StageState.encode({
    stageIndex: stage,
    modules: params.map((p) => {
      const sa = [p.hyper.r, p.inFeatures], sb = [p.outFeatures, p.hyper.r], sm = [p.outFeatures];
      const h = p.hostState(includeMoments);
      return {
        path: p.name, r: p.hyper.r, inFeatures: p.inFeatures, outFeatures: p.outFeatures,
        a: f32ToTensor(h.A, sa), b: f32ToTensor(h.B, sb),
        ...(includeMoments ? { mA: f32ToTensor(h.mA!, sa), vA: f32ToTensor(h.vA!, sa), mB: f32ToTensor(h.mB!, sb), vB: f32ToTensor(h.vB!, sb) } : {}),
        ...(h.magnitude ? { magnitude: f32ToTensor(h.magnitude, sm) } : {}),
        ...(h.magnitude && includeMoments ? { mMag: f32ToTensor(h.mMag!, sm), vMag: f32ToTensor(h.vMag!, sm) } : {}),
      };
    }),
  }).finish();
}

/** Decodes StageState bytes, checking every tensor's dtype and shape against the module's r/in/out. */
export function decodeStageState(bytes: Uint8Array, what: string): DecodedStageState {
  let msg: StageState;
  try { msg = StageState.decode(bytes); } catch (e) { throw new WireError(`${what}: malformed stage state (${(e as Error).message})`, { cause: e }); }
  const modules: LoraTensors[] = [];
  const moments: ModuleMoments[] = [];
  let withMoments = 0, withMagnitude = 0;
  for (const m of msg.modules) {
    const w = `${what} module ${m.path}`;
    if (!m.path || m.r < 1 || m.inFeatures < 1 || m.outFeatures < 1) throw new WireError(`${w}: missing path or dimensions`);
    const sa = [m.r, m.inFeatures], sb = [m.outFeatures, m.r], sm = [m.outFeatures];
    const magnitude = m.magnitude ? decodeTensorAs(m.magnitude, 'f32', sm, { what: `${w} lora_magnitude_vector` }).data : undefined;
    if (magnitude) withMagnitude++;
    modules.push({
      path: m.path, r: m.r, inFeatures: m.inFeatures, outFeatures: m.outFeatures,
      A: decodeTensorAs(m.a, 'f32', sa, { what: `${w} lora_A` }).data, B: decodeTensorAs(m.b, 'f32', sb, { what: `${w} lora_B` }).data,
      ...(magnitude ? { magnitude } : {}),
    });
    if (!magnitude && (m.mMag || m.vMag)) throw new WireError(`${w}: magnitude moments without a magnitude`);
    if (m.mA || m.vA || m.mB || m.vB) {
      withMoments++;
      moments.push({
        path: m.path,
        mA: decodeTensorAs(m.mA, 'f32', sa, { what: `${w} exp_avg A` }).data, vA: decodeTensorAs(m.vA, 'f32', sa, { what: `${w} exp_avg_sq A` }).data,
        mB: decodeTensorAs(m.mB, 'f32', sb, { what: `${w} exp_avg B` }).data, vB: decodeTensorAs(m.vB, 'f32', sb, { what: `${w} exp_avg_sq B` }).data,
        // A DoRA module's moments include its magnitude's: a checkpoint without them could not resume exactly.
        ...(magnitude ? { mMag: decodeTensorAs(m.mMag, 'f32', sm, { what: `${w} exp_avg magnitude` }).data, vMag: decodeTensorAs(m.vMag, 'f32', sm, { what: `${w} exp_avg_sq magnitude` }).data } : {}),
      });
    }
  }
  if (withMoments !== 0 && withMoments !== modules.length) throw new WireError(`${what}: optimizer moments for ${withMoments} of ${modules.length} modules`);
  // DoRA is per job: every module of a stage has a magnitude, or none has.
  if (withMagnitude !== 0 && withMagnitude !== modules.length) throw new WireError(`${what}: DoRA magnitudes for ${withMagnitude} of ${modules.length} modules`);
  return { stage: msg.stageIndex, modules, moments: withMoments ? moments : undefined };
}

/** Cuts serialized state into StateChunk payloads of at most `chunkBytes` data bytes. */
export function chunkState(bytes: Uint8Array, head: Omit<StateChunk, 'chunkIndex' | 'numChunks' | 'data' | 'crc32'>, chunkBytes: number): StateChunk[] {
  const n = Math.max(1, Math.ceil(bytes.byteLength / chunkBytes));
  const crc = crc32(bytes);
  return Array.from({ length: n }, (_, i) => ({
    ...head, chunkIndex: i, numChunks: n, crc32: crc,
    data: Buffer.from(bytes.buffer, bytes.byteOffset + i * chunkBytes, Math.min(chunkBytes, bytes.byteLength - i * chunkBytes)),
  }));
}

/** Reassembles one state stream: chunks in order, bounded size, CRC checked at the end. */
export class StateAssembler {
  private parts: Uint8Array[] = [];
  private bytes = 0;
  private first?: { numChunks: number; crc: number; commandId: number; step: number; workerId: string };

  constructor(private readonly maxBytes: number, private readonly what: string) {}

  get ids(): { commandId: number; step: number; workerId: string } | undefined { return this.first; }

  push(c: StateChunk): void {
    const at = `${this.what} chunk ${c.chunkIndex}/${c.numChunks}`;
    if (!this.first) {
      if (c.chunkIndex !== 0) throw new WireError(`${at}: the stream must start at chunk 0`);
      if (!Number.isInteger(c.numChunks) || c.numChunks < 1 || c.numChunks > 1_000_000) throw new WireError(`${at}: implausible chunk count`);
      this.first = { numChunks: c.numChunks, crc: c.crc32, commandId: c.commandId, step: c.step, workerId: c.workerId };
    } else {
      const f = this.first;
      if (c.chunkIndex !== this.parts.length) throw new WireError(`${at}: expected chunk ${this.parts.length} (duplicate or out of order)`);
      if (c.numChunks !== f.numChunks || c.crc32 !== f.crc || c.commandId !== f.commandId || c.workerId !== f.workerId) throw new WireError(`${at}: header fields changed mid-stream`);
    }
    if (this.parts.length >= this.first.numChunks) throw new WireError(`${at}: more chunks than announced`);
    this.bytes += c.data.byteLength;
    if (this.bytes > this.maxBytes) throw new WireError(`${at}: state larger than the ${this.maxBytes}-byte limit`);
    this.parts.push(c.data);
  }

  finish(): Uint8Array {
    if (!this.first) throw new WireError(`${this.what}: stream ended before any chunk arrived`);
    if (this.parts.length !== this.first.numChunks) throw new WireError(`${this.what}: stream ended after ${this.parts.length} of ${this.first.numChunks} chunks`);
    const out = Buffer.concat(this.parts);
    const crc = crc32(out);
    if (crc !== this.first.crc) throw new WireError(`${this.what}: checksum mismatch (data corrupted in transit)`);
    return out;
  }
}
