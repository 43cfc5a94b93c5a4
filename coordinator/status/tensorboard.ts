// TensorBoard event files (`report: [tensorboard]`): output_dir/tensorboard/events.out.tfevents.<time>.<host>.<pid>,
// scalars under the Hugging Face Trainer's tags (train/loss, train/learning_rate, train/grad_norm, train/epoch,
// eval/loss, ...) so dashboards made for HF runs read ours.
//
// The format, from TensorFlow's record_writer.cc and event.proto / summary.proto:
//   record  = uint64 length (LE) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
//   masked  = ((crc >>> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32); crc32c = CRC-32/Castagnoli (reflected 0x82F63B78)
//   Event   = { 1: double wall_time, 2: int64 step, 3: string file_version ("brain.Event:2", first record only),
//               5: Summary summary, 7: SessionLog session_log }
//   SessionLog = { 1: enum status (START = 1) }: TensorBoard drops the events at and after a START's step from
//               earlier files of the same directory (purge_orphaned_data), which is what a resumed run or a recovery
//               that rolled back needs — the steps after the checkpoint are trained again.
//   Summary = { 1: repeated Value value };  Value = { 1: string tag, 2: float simple_value }
// The protobuf is written by hand (4 field kinds) rather than through a generated message: the file must be
// exactly this, and the reader below decodes it from the same spec to check it.
import { appendFileSync, mkdirSync, readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import type { EvalEvent, JobObserver, JobStartEvent, RecoveryEvent, StepEvent } from '../events.ts';
import { FormatError } from '../../common/errors.ts';

const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

export function crc32c(data: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.length; i++) c = CRC32C_TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

export function maskedCrc32c(data: Uint8Array): number {
  const c = crc32c(data);
  return ((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** One TFRecord around `data`. */
export function tfRecord(data: Uint8Array): Buffer {
  const out = Buffer.alloc(8 + 4 + data.length + 4);
  out.writeBigUInt64LE(BigInt(data.length), 0);
  out.writeUInt32LE(maskedCrc32c(out.subarray(0, 8)), 8);
  out.set(data, 12);
  out.writeUInt32LE(maskedCrc32c(data), 12 + data.length);
  return out;
}

// --- protobuf, the four field kinds the Event needs ---
function varint(n: bigint): number[] {
  const out: number[] = [];
  let v = BigInt.asUintN(64, n);
  do { let b = Number(v & 0x7fn); v >>= 7n; if (v) b |= 0x80; out.push(b); } while (v);
  return out;
}
const key = (field: number, wire: number): number[] => varint(BigInt((field << 3) | wire));
function lenField(field: number, bytes: Uint8Array): Buffer { return Buffer.concat([Buffer.from(key(field, 2)), Buffer.from(varint(BigInt(bytes.length))), bytes]); }

export interface Scalar { readonly tag: string; readonly value: number }

/** Event { wall_time, step, summary { value: [{ tag, simple_value }] } } or the file_version event. */
export function encodeEvent(e: { wallTime: number; step: number; fileVersion?: string; scalars?: readonly Scalar[]; sessionStart?: boolean }): Buffer {
  const parts: Buffer[] = [];
  const wt = Buffer.alloc(8); wt.writeDoubleLE(e.wallTime);
  parts.push(Buffer.from(key(1, 1)), wt);
  if (e.step !== 0) parts.push(Buffer.from([...key(2, 0), ...varint(BigInt(e.step))]));
  if (e.fileVersion !== undefined) parts.push(lenField(3, Buffer.from(e.fileVersion, 'utf8')));
  if (e.scalars?.length) {
    const values = e.scalars.map((s) => {
      const f = Buffer.alloc(4); f.writeFloatLE(s.value);
      return lenField(1, Buffer.concat([lenField(1, Buffer.from(s.tag, 'utf8')), Buffer.from(key(2, 5)), f]));
    });
    parts.push(lenField(5, Buffer.concat(values)));
  }
  if (e.sessionStart) parts.push(lenField(7, Buffer.from([...key(1, 0), 1])));
  return Buffer.concat(parts);
}

// --- reader (from the spec; used by the tests and `coordinator status`-style tools) ---
export interface DecodedEvent { wallTime: number; step: number; fileVersion?: string; scalars: Scalar[]; sessionStart?: boolean }

interface Field { field: number; wire: number; int?: bigint; bytes?: Buffer }
function fields(buf: Buffer, where: string): Field[] {
  const out: Field[] = [];
  let p = 0;
  const readVarint = (): bigint => {
    let v = 0n, shift = 0n;
    for (;;) {
      if (p >= buf.length) throw new FormatError(`${where}: truncated varint`);
      const b = buf[p++];
      v |= BigInt(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
      shift += 7n;
      if (shift > 63n) throw new FormatError(`${where}: varint longer than 10 bytes`);
    }
  };
  while (p < buf.length) {
    const k = Number(readVarint()), field = k >>> 3, wire = k & 7;
    const take = (n: number): Buffer => { if (p + n > buf.length) throw new FormatError(`${where}: field ${field} runs past the end`); const b = buf.subarray(p, p + n); p += n; return b; };
    if (wire === 0) out.push({ field, wire, int: readVarint() });
    else if (wire === 1) out.push({ field, wire, bytes: take(8) });
    else if (wire === 2) out.push({ field, wire, bytes: take(Number(readVarint())) });
    else if (wire === 5) out.push({ field, wire, bytes: take(4) });
    else throw new FormatError(`${where}: unsupported wire type ${wire} (field ${field})`);
  }
  return out;
}

export function decodeEvent(buf: Buffer, where = 'event'): DecodedEvent {
  const e: DecodedEvent = { wallTime: 0, step: 0, scalars: [] };
  for (const f of fields(buf, where)) {
    if (f.field === 1 && f.wire === 1) e.wallTime = f.bytes!.readDoubleLE(0);
    else if (f.field === 2 && f.wire === 0) e.step = Number(BigInt.asIntN(64, f.int!));
    else if (f.field === 3 && f.wire === 2) e.fileVersion = f.bytes!.toString('utf8');
    else if (f.field === 7 && f.wire === 2) e.sessionStart = fields(f.bytes!, `${where}.session_log`).some((x) => x.field === 1 && x.wire === 0 && x.int === 1n);
    else if (f.field === 5 && f.wire === 2) {
      for (const v of fields(f.bytes!, `${where}.summary`)) {
        if (v.field !== 1 || v.wire !== 2) continue;
        let tag = '', value: number | undefined;
        for (const x of fields(v.bytes!, `${where}.summary.value`)) {
          if (x.field === 1 && x.wire === 2) tag = x.bytes!.toString('utf8');
          else if (x.field === 2 && x.wire === 5) value = x.bytes!.readFloatLE(0);
        }
        if (value !== undefined) e.scalars.push({ tag, value });
      }
    }
  }
  return e;
}

/** Reads every record of an event file, checking both CRCs; a bad record is an error naming its byte offset. */
export function readEventFile(path: string): DecodedEvent[] {
  const buf = readFileSync(path);
  const out: DecodedEvent[] = [];
  let p = 0;
  while (p < buf.length) {
    if (p + 12 > buf.length) throw new FormatError(`${path}@${p}: truncated record header`);
    const len = Number(buf.readBigUInt64LE(p));
    if (buf.readUInt32LE(p + 8) !== maskedCrc32c(buf.subarray(p, p + 8))) throw new FormatError(`${path}@${p}: length CRC mismatch`);
    if (p + 12 + len + 4 > buf.length) throw new FormatError(`${path}@${p}: record of ${len} bytes runs past the end`);
    const data = buf.subarray(p + 12, p + 12 + len);
    if (buf.readUInt32LE(p + 12 + len) !== maskedCrc32c(data)) throw new FormatError(`${path}@${p}: data CRC mismatch`);
    out.push(decodeEvent(data, `${path}@${p}`));
    p += 12 + len + 4;
  }
  return out;
}

export class TensorBoardObserver implements JobObserver {
  path = '';
  private epoch = 0;

  constructor(private readonly now: () => number = Date.now) {}

  onStart(e: JobStartEvent): void {
    const dir = join(e.outputDir, 'tensorboard');
    mkdirSync(dir, { recursive: true });
    const t = this.now() / 1000;
    this.path = join(dir, `events.out.tfevents.${Math.floor(t)}.${hostname()}.${process.pid}`);
    this.write({ wallTime: t, step: e.startStep, fileVersion: 'brain.Event:2' });
    if (e.startStep > 0) this.write({ wallTime: t, step: e.startStep + 1, sessionStart: true });
  }

  onRecovery(e: RecoveryEvent): void {
    this.write({ wallTime: this.now() / 1000, step: e.step + 1, sessionStart: true });
  }

  onStep(e: StepEvent): void {
    this.epoch = e.epoch;
    this.write({ wallTime: this.now() / 1000, step: e.step, scalars: [
      { tag: 'train/loss', value: e.loss }, { tag: 'train/learning_rate', value: e.lr }, { tag: 'train/grad_norm', value: e.gradNorm },
      { tag: 'train/epoch', value: e.epoch }, { tag: 'train/tokens_per_second', value: e.seconds > 0 ? e.tokens / e.seconds : 0 },
    ] });
  }

  onEval(e: EvalEvent): void {
    this.write({ wallTime: this.now() / 1000, step: e.step, scalars: [
      { tag: 'eval/loss', value: e.loss }, { tag: 'eval/perplexity', value: e.perplexity }, { tag: 'train/epoch', value: this.epoch },
    ] });
  }

  private write(e: Parameters<typeof encodeEvent>[0]): void {
    if (this.path) appendFileSync(this.path, tfRecord(encodeEvent(e)));
  }
}
