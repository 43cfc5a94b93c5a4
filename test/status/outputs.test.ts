// What a run leaves in output_dir for people and tools: train_log.jsonl (HF log_history keys), loss.svg and
// TensorBoard event files — written by their observers from the events of a real tiny run, and read back:
// the log line by line against the run's own trainer_state.json, the plot by inverting its axes, the event files
// by a reader written from the TFRecord/Event spec (CRC32C checked against the RFC 3720 test vectors) and by
// protobufjs on TensorFlow's event.proto field numbers (TensorBoard itself is not installable here: no PyPI, no
// Debian package).
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { recordRealRun, replay, type RecordedRun } from '../helpers/recorded-run.ts';
import { TrainLogObserver, readTrainLog, TRAIN_LOG } from '../../coordinator/status/train-log.ts';
import { LossPlotObserver, LOSS_PLOT, niceTicks } from '../../coordinator/status/loss-plot.ts';
import { TensorBoardObserver, crc32c, decodeEvent, maskedCrc32c, readEventFile, tfRecord, encodeEvent } from '../../coordinator/status/tensorboard.ts';
import protobuf from 'protobufjs';
import type { JobStartEvent } from '../../coordinator/events.ts';

let rec: RecordedRun;
before(async () => { rec = await recordRealRun(mkdtempSync(join(tmpdir(), 'dqlora-outputs-'))); });

const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;

test('train_log.jsonl: one line per step and evaluation with HF log_history keys and the run\'s exact numbers, then the run summary', () => {
  const out = rec.job.output_dir;
  replay(rec.events, [new TrainLogObserver(1)]);
  const lines = readFileSync(join(out, TRAIN_LOG), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, number>);
  const steps = lines.filter((l) => 'loss' in l), evals = lines.filter((l) => 'eval_loss' in l);
  assert.equal(steps.length, 8);
  steps.forEach((l, i) => {
    const h = rec.state.history[i];
    assert.deepEqual(Object.keys(l), ['loss', 'grad_norm', 'learning_rate', 'epoch', 'step']);
    assert.deepEqual(l, { loss: h.loss, grad_norm: h.gradNorm, learning_rate: h.lr, epoch: h.step / rec.state.stepsPerEpoch, step: h.step });
  });
  // step 8 is evaluated once: by eval_every, and the final evaluation reuses it (the weights did not change)
  const recorded = rec.events.flatMap((r) => (r.kind === 'eval' ? [[r.e.step, r.e.loss]] : []));
  assert.deepEqual(recorded.at(-1), [8, rec.outcome.evalLoss]);
  assert.equal(recorded.filter(([step]) => step === 8).length, 1, 'the last step was evaluated twice');
  assert.deepEqual(evals.map((l) => [l.step, l.eval_loss]), recorded);
  const last = lines.at(-1)!;
  assert.equal(last.step, 8);
  assert.equal(last.train_loss, mean(rec.state.history.map((h) => h.loss)));
  assert.ok(last.train_runtime > 0 && last.train_tokens_per_second > 0);
  assert.equal(lines.length, 8 + recorded.length + 1);
});

test('train_log.jsonl with log_every 3: a line every 3 steps (and the last) whose loss is the mean since the previous line, as HF logs it', () => {
  replay(rec.events, [new TrainLogObserver(3)]);
  const steps = readTrainLog(join(rec.job.output_dir, TRAIN_LOG)).filter((l) => l.loss !== undefined);
  const L = rec.state.history.map((h) => h.loss);
  assert.deepEqual(steps.map((l) => l.step), [3, 6, 8]);
  assert.deepEqual(steps.map((l) => l.loss), [mean(L.slice(0, 3)), mean(L.slice(3, 6)), mean(L.slice(6, 8))]);
  assert.deepEqual(steps.map((l) => l.grad_norm), [3, 6, 8].map((s) => rec.state.history[s - 1].gradNorm));
});

test('a resumed run keeps the log up to its start step and continues it without duplicates; its loss.svg covers the whole run', () => {
  const out = rec.job.output_dir;
  const cut = rec.events.findIndex((r) => r.kind === 'step' && r.e.step === 7);
  replay(rec.events.slice(0, cut), [new TrainLogObserver(1), new LossPlotObserver()]);   // "killed" after step 6
  // the second invocation resumes from the step-4 checkpoint: steps 5.. are done again
  const start = rec.events[0].e as JobStartEvent;
  const resumed = [{ kind: 'start' as const, e: { ...start, startStep: 4, resumedFrom: 'checkpoints/step-000004' } },
    ...rec.events.filter((r) => r.kind !== 'start' && r.e.step > 4)];
  replay(resumed, [new TrainLogObserver(1), new LossPlotObserver()]);
  const log = readTrainLog(join(out, TRAIN_LOG));
  assert.deepEqual(log.filter((l) => l.loss !== undefined).map((l) => l.step), [1, 2, 3, 4, 5, 6, 7, 8]);
  // the same within one invocation: a recovery at step 7 back to the step-4 checkpoint, then steps 5.. again
  const steps = rec.events.filter((r) => r.kind === 'step');
  replay([rec.events[0], ...steps.slice(0, 7), { kind: 'recovery', e: { step: 4, attempt: 1, reason: 'worker lost', resumeFrom: 'step-000004' } }, ...steps.slice(4)], [new TrainLogObserver(1)]);
  assert.deepEqual(readTrainLog(join(out, TRAIN_LOG)).map((l) => l.step), [1, 2, 3, 4, 5, 6, 7, 8]);
  assert.deepEqual(log.filter((l) => l.eval_loss !== undefined).map((l) => l.step), rec.events.flatMap((r) => (r.kind === 'eval' ? [r.e.step] : [])));
  const svg = readFileSync(join(out, LOSS_PLOT), 'utf8');
  assert.equal(/id="train-loss" d="([^"]+)"/.exec(svg)![1].split(' ').length, 8);
});

test('loss.svg: reading the plot back through its axis ticks gives the run\'s losses', () => {
  replay(rec.events, [new LossPlotObserver()]);
  const svg = readFileSync(join(rec.job.output_dir, LOSS_PLOT), 'utf8');
  assert.match(svg, /^<svg xmlns="http:\/\/www.w3.org\/2000\/svg"/);
  assert.equal((svg.match(/<(?!\/)(?!line|rect|path|circle|text|g|svg|title)/g) ?? []).length, 0, 'only the SVG elements we write');
  // axis calibration from the tick labels and their pixel positions (two ticks fix a linear axis)
  const yt = [...svg.matchAll(/class="ytick" x="[^"]+" y="([^"]+)"[^>]*>([^<]+)</g)].map((m) => [Number(m[1]) - 4, Number(m[2])]);
  const xt = [...svg.matchAll(/class="xtick" x="([^"]+)"[^>]*>([^<]+)</g)].map((m) => [Number(m[1]), Number(m[2])]);
  assert.ok(yt.length >= 2 && xt.length >= 2, 'at least two ticks per axis');
  const inv = (t: number[][]) => (px: number): number => t[0][1] + ((px - t[0][0]) * (t.at(-1)![1] - t[0][1])) / (t.at(-1)![0] - t[0][0]);
  const toLoss = inv(yt), toStep = inv(xt);
  const pts = /id="train-loss" d="([^"]+)"/.exec(svg)![1].split(' ').map((p) => p.slice(1).split(',').map(Number));
  const lossRange = Math.max(...rec.state.history.map((h) => h.loss)) - Math.min(...rec.state.history.map((h) => h.loss));
  assert.equal(pts.length, rec.state.history.length);
  pts.forEach(([x, y], i) => {
    assert.ok(Math.abs(toStep(x) - rec.state.history[i].step) < 0.01, `point ${i} at step ${rec.state.history[i].step}`);
    assert.ok(Math.abs(toLoss(y) - rec.state.history[i].loss) < lossRange * 2e-3, `point ${i}: ${toLoss(y)} ≈ ${rec.state.history[i].loss}`);
  });
  const evalPts = [...svg.matchAll(/class="eval-point" cx="([^"]+)" cy="([^"]+)"/g)].map((m) => [toStep(Number(m[1])), toLoss(Number(m[2]))]);
  assert.deepEqual(evalPts.map((p) => Math.round(p[0])), [4, 8], 'one eval point per step (a repeated evaluation replaces the earlier one)');
  assert.ok(Math.abs(evalPts[1][0] - 8) < 0.01 && Math.abs(evalPts[1][1] - rec.outcome.evalLoss!) < lossRange * 2e-3);
  assert.deepEqual(niceTicks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  assert.deepEqual(niceTicks(1, 8), [2, 4, 6, 8]);
});

test('CRC32C and its mask match the spec\'s test vectors (RFC 3720 B.4; TensorFlow crc32c Mask)', () => {
  assert.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
  assert.equal(crc32c(new Uint8Array(32)), 0x8a9136aa);
  assert.equal(crc32c(new Uint8Array(32).fill(0xff)), 0x62a8ab43);
  assert.equal(crc32c(Uint8Array.from({ length: 32 }, (_, i) => i)), 0x46dd794e);
  assert.equal(crc32c(Uint8Array.from({ length: 32 }, (_, i) => 31 - i)), 0x113fdb5c);
  const c = crc32c(Buffer.from('foo'));
  assert.equal(maskedCrc32c(Buffer.from('foo')), ((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) >>> 0);
  // a record's framing: length, its masked CRC, the data, the data's masked CRC
  const r = tfRecord(Buffer.from('abc'));
  assert.equal(r.length, 8 + 4 + 3 + 4);
  assert.equal(r.readBigUInt64LE(0), 3n);
  assert.equal(r.readUInt32LE(15), maskedCrc32c(Buffer.from('abc')));
});

test('TensorBoard event files (report: [tensorboard]): file_version first, then HF-tagged scalars per step and eval; corruption is detected', () => {
  const t = new TensorBoardObserver(() => 1_700_000_000_000);
  replay(rec.events, [t]);
  const dir = join(rec.job.output_dir, 'tensorboard');
  assert.match(readdirSync(dir).find((f) => t.path.endsWith(f))!, /^events\.out\.tfevents\.1700000000\./);
  const events = readEventFile(t.path);
  assert.equal(events[0].fileVersion, 'brain.Event:2');
  assert.equal(events[0].wallTime, 1_700_000_000);
  const steps = events.filter((e) => e.scalars.some((s) => s.tag === 'train/loss'));
  assert.deepEqual(steps.map((e) => e.step), [1, 2, 3, 4, 5, 6, 7, 8]);
  steps.forEach((e, i) => {
    const h = rec.state.history[i], v = Object.fromEntries(e.scalars.map((s) => [s.tag, s.value]));
    assert.equal(v['train/loss'], Math.fround(h.loss));
    assert.equal(v['train/learning_rate'], Math.fround(h.lr));
    assert.equal(v['train/grad_norm'], Math.fround(h.gradNorm));
    assert.equal(v['train/epoch'], Math.fround(h.step / rec.state.stepsPerEpoch));
  });
  const evals = events.filter((e) => e.scalars.some((s) => s.tag === 'eval/loss'));
  assert.deepEqual(evals.map((e) => [e.step, e.scalars[0].value]), rec.events.flatMap((r) => (r.kind === 'eval' ? [[r.e.step, Math.fround(r.e.loss)]] : [])));
  // The protobuf bytes, by hand from event.proto: wall_time (1, fixed64), step (2, varint), summary (5) { value (1) { tag (1), simple_value (2, fixed32) } }
  const b = encodeEvent({ wallTime: 1.5, step: 300, scalars: [{ tag: 'a', value: 2 }] });
  assert.equal(b.toString('hex'), '09' + '000000000000f83f' + '10' + 'ac02' + '2a' + '0a' + '0a' + '08' + '0a0161' + '15' + '00000040');
  // a resumed run (or a recovery) marks where TensorBoard must drop the earlier invocation's steps: SessionLog START
  assert.equal(encodeEvent({ wallTime: 0, step: 5, sessionStart: true }).toString('hex'), '09' + '0000000000000000' + '1005' + '3a020801');
  const resumed = new TensorBoardObserver(() => 1_700_000_100_000);
  replay([{ kind: 'start', e: { ...(rec.events[0].e as JobStartEvent), startStep: 4 } }, { kind: 'recovery', e: { step: 6, attempt: 1, reason: 'lost', resumeFrom: 'x' } }], [resumed]);
  assert.deepEqual(readEventFile(resumed.path).map((e) => [e.step, e.fileVersion ?? null, e.sessionStart ?? false]), [[4, 'brain.Event:2', false], [5, null, true], [7, null, true]]);
  // a flipped byte in the data is refused, naming the file and offset
  const bad = readFileSync(t.path); bad[bad.length - 6] ^= 0xff;
  const badPath = t.path + '.bad';
  writeFileSync(badPath, bad);
  assert.throws(() => readEventFile(badPath), /data CRC mismatch/);
  rmSync(badPath);
});

// tensorflow/core/util/event.proto and framework/summary.proto, the fields we write (numbers as in TensorFlow).
const EVENT_PROTO = `
syntax = "proto3";
package tensorflow;
message Summary {
  message Value { string node_name = 7; string tag = 1; oneof value { float simple_value = 2; bytes obsolete_old_style_histogram = 3; } }
  repeated Value value = 1;
}
message SessionLog { enum SessionStatus { STATUS_UNSPECIFIED = 0; START = 1; STOP = 2; CHECKPOINT = 3; } SessionStatus status = 1; string checkpoint_path = 2; string msg = 3; }
message Event {
  double wall_time = 1;
  int64 step = 2;
  oneof what { string file_version = 3; bytes graph_def = 4; Summary summary = 5; SessionLog session_log = 7; bytes meta_graph_def = 9; }
}`;

test('TensorBoard events agree with an independent protobuf implementation (protobufjs on event.proto), both ways', () => {
  const Event = protobuf.parse(EVENT_PROTO).root.lookupType('tensorflow.Event');
  const t = new TensorBoardObserver(() => 1_700_000_200_500);
  replay(rec.events, [t]);
  replay([{ kind: 'recovery', e: { step: 4, attempt: 1, reason: 'lost', resumeFrom: 'x' } }], [t]);
  // ours → protobufjs: every record of the file decodes to the same fields
  const buf = readFileSync(t.path);
  const ours = readEventFile(t.path);
  let p = 0, i = 0;
  while (p < buf.length) {
    const len = Number(buf.readBigUInt64LE(p));
    const e = Event.toObject(Event.decode(buf.subarray(p + 12, p + 12 + len)), { longs: Number, enums: String, defaults: false }) as {
      wallTime: number; step?: number; fileVersion?: string; summary?: { value: { tag: string; simpleValue: number }[] }; sessionLog?: { status: string };
    };
    const o = ours[i++];
    assert.equal(e.wallTime, o.wallTime);
    assert.equal(e.step ?? 0, o.step);
    assert.equal(e.fileVersion, o.fileVersion);
    assert.deepEqual((e.summary?.value ?? []).map((v) => ({ tag: v.tag, value: v.simpleValue })), o.scalars);
    assert.equal(e.sessionLog?.status === 'START', o.sessionStart === true);
    p += 12 + len + 4;
  }
  assert.equal(i, ours.length);
  assert.deepEqual(ours.filter((e) => e.sessionStart).map((e) => e.step), [5]);
  // protobufjs → ours: an Event it encodes is read back by our decoder
  const bytes = Buffer.from(Event.encode(Event.create({ wallTime: 12.25, step: 123456789012, summary: { value: [{ tag: 'train/loss', simpleValue: 0.5 }, { tag: 'eval/loss', simpleValue: 1.25 }] } })).finish());
  assert.deepEqual(decodeEvent(bytes), { wallTime: 12.25, step: 123456789012, scalars: [{ tag: 'train/loss', value: 0.5 }, { tag: 'eval/loss', value: 1.25 }] });
  const start = Buffer.from(Event.encode(Event.create({ wallTime: 1, step: 5, sessionLog: { status: 1 } })).finish());
  assert.equal(decodeEvent(start).sessionStart, true);
  assert.deepEqual(start, encodeEvent({ wallTime: 1, step: 5, sessionStart: true }));
});
