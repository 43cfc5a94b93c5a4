// Chaos experiments on the real CLI with real processes on loopback (see harness.ts for the job and for what
// "the same result" means). Each experiment injects one fault at a seeded moment and requires the final
// adapter to be byte-identical to the undisturbed run's, with every sample trained exactly once.
// `npm test` runs one trial of each; `npm run test:chaos` runs $CHAOS_TRIALS (default 5) with other seeds.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { natsServerMissing } from '../helpers/nats.ts';
import {
  STEPS, TRIALS, SEED, alive, descendants, faultMoment, natsPids, result, sleep, startCli, waitFor, work, workerPids, writeJob, type RunResult,
} from './harness.ts';

const skip = natsServerMissing();
let reference: RunResult | undefined;
let seq = 0;
const fresh = (name: string): string => join(work, `${name}-${++seq}`);

function assertSameAsReference(out: string, what: string): void {
  assert.ok(reference, 'needs the undisturbed run');
  const got = result(out);
  assert.deepEqual(got.history.map((h) => h.step), Array.from({ length: STEPS }, (_, i) => i + 1), `${what}: every step exactly once`);
  assert.deepEqual(got.history, reference.history, `${what}: the same samples, losses and learning rates at every step`);
  assert.ok(got.adapter.equals(reference.adapter), `${what}: the adapter is byte-identical to the undisturbed run's`);
}

/** No stack trace and no raw errno in what the user sees. */
function assertCleanError(stderr: string): void {
  assert.doesNotMatch(stderr, /^\s+at .+:\d+:\d+\)?$/m, 'no stack trace');
}

before(async () => {
  if (skip) return;
  const out = fresh('reference');
  const r = startCli(writeJob(out));
  const d = await r.done;
  assert.equal(d.code, 0, d.stderr.slice(-3000));
  reference = result(out);
});
after(() => { if (!process.env.CHAOS_KEEP) rmSync(work, { recursive: true, force: true }); });

test('kill -9 of a worker at a seeded moment: the job recovers to the same adapter', { skip, timeout: 120_000 * TRIALS }, async (t) => {
  for (let trial = 0; trial < TRIALS; trial++) {
    const m = faultMoment(1, trial);
    const out = fresh('kill-worker');
    const r = startCli(writeJob(out));
    await r.afterStep(m.step);
    await sleep(m.delayMs);
    const ws = workerPids(r.proc.pid!);
    assert.equal(ws.length, 4, 'four local workers');
    const victim = ws[m.pick(ws.length)];
    process.kill(victim, 'SIGKILL');
    const at = r.lastStep();
    const d = await r.done;
    t.diagnostic(`trial ${trial}: worker ${victim} killed after step ${at} (planned ${m.step} + ${m.delayMs} ms)`);
    assert.equal(d.code, 0, `trial ${trial} (seed ${SEED}, after step ${m.step} + ${m.delayMs} ms):\n${d.stdout}\n${d.stderr.slice(-3000)}`);
    // Killed before the last step: the loss is noticed and recovered from.
    if (at < STEPS - 1) assert.match(d.stdout, /worker failure at step \d+: worker w\d+ \(stage [01], replica [01]\) lost/);
    assertSameAsReference(out, `kill -9 worker, trial ${trial}`);
  }
});

test('SIGSTOP of a worker: it is killed and replaced after the heartbeat timeout; same adapter', { skip, timeout: 150_000 * TRIALS }, async (t) => {
  for (let trial = 0; trial < TRIALS; trial++) {
    const m = faultMoment(2, trial);
    const out = fresh('stop-worker');
    const r = startCli(writeJob(out));
    await r.afterStep(m.step);
    await sleep(m.delayMs);
    const ws = workerPids(r.proc.pid!);
    const victim = ws[m.pick(ws.length)];
    const t0 = Date.now();
    process.kill(victim, 'SIGSTOP');
    const at = r.lastStep();
    t.diagnostic(`trial ${trial}: worker ${victim} stopped after step ${at} (planned ${m.step} + ${m.delayMs} ms)`);
    try {
      // killed (not merely declared lost) within the heartbeat timeout (2 s) plus the watchdog's period
      await waitFor(() => !alive(victim), 10_000, `the stalled worker ${victim} to be killed`);
      const killedAfter = Date.now() - t0;
      const d = await r.done;
      assert.equal(d.code, 0, `trial ${trial}:\n${d.stdout}\n${d.stderr.slice(-3000)}`);
      if (at < STEPS - 1) assert.match(d.stdout, /lost: no heartbeat for \d+\.\d s \(stalled or cut off\)/);
      assert.ok(killedAfter < 10_000, `killed after ${killedAfter} ms`);
      assertSameAsReference(out, `SIGSTOP worker, trial ${trial}`);
    } finally {
      if (alive(victim)) process.kill(victim, 'SIGKILL');
    }
  }
});

test('kill -9 of the coordinator: its workers and nats-server exit within seconds; a restart resumes to the same adapter', { skip, timeout: 150_000 * TRIALS }, async (t) => {
  for (let trial = 0; trial < TRIALS; trial++) {
    const m = faultMoment(3, trial);
    const out = fresh('kill-coordinator');
    const job = writeJob(out);
    const r = startCli(job);
    await r.afterStep(m.step);
    await sleep(m.delayMs);
    const children = descendants(r.proc.pid!).map((p) => p.pid);
    assert.ok(natsPids(r.proc.pid!).length === 1 && workerPids(r.proc.pid!).length === 4, 'a nats-server and four workers run');
    r.proc.kill('SIGKILL');
    t.diagnostic(`trial ${trial}: coordinator killed after step ${r.lastStep()}`);
    await r.done;
    try {
      await waitFor(() => children.every((p) => !alive(p)), 10_000, `the coordinator's children (${children.join(', ')}) to exit`);
    } finally {
      for (const p of children) if (alive(p)) process.kill(p, 'SIGKILL');
    }
    const again = startCli(job);
    const d = await again.done;
    assert.equal(d.code, 0, `trial ${trial}:\n${d.stdout}\n${d.stderr.slice(-3000)}`);
    if (existsSync(join(out, 'run', 'checkpoints', 'step-000002'))) assert.match(d.stdout, /resumed from .*step-\d+ at step \d+\/12/);
    assertSameAsReference(out, `kill -9 coordinator, trial ${trial}`);
  }
});

test('kill -9 of the private nats-server: the coordinator restarts it and the job ends with the same adapter', { skip, timeout: 150_000 * TRIALS }, async (t) => {
  for (let trial = 0; trial < TRIALS; trial++) {
    const m = faultMoment(4, trial);
    const out = fresh('kill-nats');
    const r = startCli(writeJob(out, { distributed: { step_timeout_s: 8 } }));
    await r.afterStep(m.step);
    await sleep(m.delayMs);
    const [nats] = natsPids(r.proc.pid!);
    assert.ok(nats, 'the private nats-server runs');
    process.kill(nats, 'SIGKILL');
    t.diagnostic(`trial ${trial}: nats-server ${nats} killed after step ${r.lastStep()}`);
    await waitFor(() => natsPids(r.proc.pid!).some((p) => p !== nats) || r.proc.exitCode !== null, 15_000, 'a new nats-server');
    const d = await r.done;
    assert.equal(d.code, 0, `trial ${trial}:\n${d.stdout}\n${d.stderr.slice(-3000)}`);
    assert.match(d.stderr, /local nats-server restarted/);
    assertSameAsReference(out, `kill -9 nats-server, trial ${trial}`);
  }
});

/** Damages checkpoint `dir` in one of four ways (seeded). */
function corrupt(dir: string, how: number): string {
  switch (how % 4) {
    case 0: { const f = join(dir, 'optimizer.safetensors'); const b = readFileSync(f); b[b.length >> 1] ^= 0x40; writeFileSync(f, b); return 'optimizer.safetensors is corrupt'; }
    case 1: { const f = join(dir, 'adapter', 'adapter_model.safetensors'); writeFileSync(f, readFileSync(f).subarray(0, 100)); return 'adapter/adapter_model.safetensors is corrupt'; }
    case 2: rmSync(join(dir, 'manifest.json')); return 'no manifest.json';
    default: writeFileSync(join(dir, 'trainer_state.json'), '{"step": 1'); return 'trainer_state.json is corrupt';
  }
}

test('a corrupt newest checkpoint: resume falls back to the previous valid one, says which it skipped and why; same adapter', { skip, timeout: 120_000 * TRIALS }, async (t) => {
  for (let trial = 0; trial < TRIALS; trial++) {
    const m = faultMoment(5, trial);
    const out = fresh('corrupt-resume');
    const job = writeJob(out);
    const stopAt = 3 + m.pick(STEPS - 3); // 3..7: at least one older checkpoint (step 2) exists
    const first = await startCli(job, ['--stop-after', String(stopAt)]).done;
    assert.equal(first.code, 0, first.stderr.slice(-3000));
    const newest = join(out, 'run', 'checkpoints', `step-${String(stopAt).padStart(6, '0')}`);
    const why = corrupt(newest, m.pick(4));
    const d = await startCli(job).done;
    assert.equal(d.code, 0, `trial ${trial}:\n${d.stdout}\n${d.stderr.slice(-3000)}`);
    assert.ok(d.stdout.includes(`skipping checkpoint ${newest}: `) && d.stdout.includes(why), `reports the skip (${why}):\n${d.stdout}`);
    assert.match(d.stdout, /resumed from .*step-\d+ at step \d+\/12/);
    assertSameAsReference(out, `corrupt newest checkpoint on resume, trial ${trial}`);
  }
});

test('a corrupt newest checkpoint during a run, then a worker failure: the recovery falls back too; same adapter', { skip, timeout: 120_000 * TRIALS }, async (t) => {
  for (let trial = 0; trial < TRIALS; trial++) {
    const m = faultMoment(6, trial);
    const out = fresh('corrupt-recovery');
    const r = startCli(writeJob(out));
    await r.afterStep(Math.max(3, m.step)); // at least the step-2 checkpoint exists
    const root = join(out, 'run', 'checkpoints');
    const newest = readdirSync(root).filter((n) => /^step-\d+$/.test(n)).sort().at(-1)!;
    const why = corrupt(join(root, newest), m.pick(4));
    const ws = workerPids(r.proc.pid!);
    process.kill(ws[m.pick(ws.length)], 'SIGKILL');
    const at = r.lastStep();
    t.diagnostic(`trial ${trial}: ${newest} damaged (${why}) and a worker killed after step ${at}`);
    const d = await r.done;
    assert.equal(d.code, 0, `trial ${trial}:\n${d.stdout}\n${d.stderr.slice(-3000)}`);
    if (at < STEPS - 1) {
      const back = /paused; resuming from (.+?) \(step (\d+)\)/.exec(d.stdout); // a checkpoint, or 'the initial state'
      assert.ok(back, `a recovery:\n${d.stdout}`);
      const damaged = Number(newest.slice(5));
      assert.notEqual(Number(back[2]), damaged, 'never the damaged checkpoint');
      // no newer checkpoint was written before the failure: the damaged one was the candidate, and was skipped
      if (Number(back[2]) < damaged) assert.ok(d.stdout.includes(`skipping checkpoint ${join(root, newest)}: `) && d.stdout.includes(why), `reports the skip:\n${d.stdout}`);
    }
    assertSameAsReference(out, `corrupt checkpoint + recovery, trial ${trial}`);
  }
});

const isRoot = process.getuid?.() === 0;
test('disk full: the job ends with a clear error and no temp directory; with space again, it resumes to the same adapter', { skip: skip ?? (isRoot ? undefined : 'needs root to mount a small tmpfs'), timeout: 120_000 * TRIALS }, async (t) => {
  for (let trial = 0; trial < TRIALS; trial++) {
    const out = fresh('disk-full');
    const job = writeJob(out);
    const run = join(out, 'run');
    // room for two checkpoints (~108 KiB each on tmpfs) and the small files: the third write fails
    const mnt = spawnSync('mkdir', ['-p', run]).status === 0 && spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=300k', 'tmpfs', run]);
    if (!mnt || mnt.status !== 0) { t.skip(`cannot mount a tmpfs: ${mnt ? mnt.stderr.toString().trim() : 'mkdir failed'}`); return; }
    try {
      const d = await startCli(job).done;
      assert.equal(d.code, 1, `expected a failure:\n${d.stdout}\n${d.stderr.slice(-2000)}`);
      assert.match(d.stderr, /error: cannot write checkpoint step-\d+ in .*: no space left on device/);
      assert.match(d.stderr, /hint: the disk is full/);
      assertCleanError(d.stderr);
      assert.deepEqual(readdirSync(join(run, 'checkpoints')).filter((n) => n.includes('.tmp-')), [], 'no temp directory left');
      assert.equal(spawnSync('mount', ['-o', 'remount,size=4m', run]).status, 0);
      const again = await startCli(job).done;
      assert.equal(again.code, 0, `trial ${trial}:\n${again.stdout}\n${again.stderr.slice(-3000)}`);
      assertSameAsReference(out, `disk full, trial ${trial}`);
    } finally {
      spawnSync('umount', [run]);
    }
  }
});
