// Choosing a checkpoint to resume from, and what a failed write leaves behind: the newest VALID checkpoint
// wins (a missing manifest, a corrupt file or a refused fingerprint make one invalid, and each skip is
// reported with its reason); a full disk ends in a CheckpointError that says so, with no temp directory left.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  checkpointRoot, listCheckpoints, newestValidCheckpoint, removeStaleTemps, saveCheckpoint, type TrainerState,
} from '../../common/checkpoint.ts';
import { CheckpointError, CheckpointWriteError, EXIT, exitCodeFor } from '../../common/errors.ts';

const work = mkdtempSync(join(tmpdir(), 'dqlora-ckrec-'));
const LORA = { r: 2, alpha: 2, dropout: 0, useRslora: false, targetModules: ['v_proj'] };

/** A real checkpoint at `step` whose weights encode the step (A[i] = step + i/10), so a load shows which one it was. */
function save(out: string, step: number, opts: { configHash?: string; modulesScale?: number; keep?: number } = {}): string {
  const A = Float32Array.from({ length: 8 }, (_, i) => step + i / 10);
  const modules = [{ path: 'model.layers.0.self_attn.v_proj', r: 2, inFeatures: 4, outFeatures: 2, A, B: new Float32Array(4).fill(step) }];
  const moments = [{ path: modules[0].path, mA: new Float32Array(8), vA: new Float32Array(8), mB: new Float32Array(4), vB: new Float32Array(4) }];
  const state: TrainerState = { step, totalSteps: 9, stepsPerEpoch: 3, configHash: opts.configHash ?? 'c', dataHash: 'd', history: [], evalHistory: [] };
  return saveCheckpoint(out, { state, modules, moments, loraConfig: LORA }, 'model', opts.keep ?? 10);
}

test('resume picks the newest valid checkpoint and names every newer one it skipped, with the reason', () => {
  const out = join(work, 'fallback');
  save(out, 2); save(out, 4); const d6 = save(out, 6); const d8 = save(out, 8);
  // step 8: a corrupt optimizer file; step 6: its manifest deleted (an interrupted or tampered write)
  const opt = join(d8, 'optimizer.safetensors');
  const b = readFileSync(opt); b[b.length - 1] ^= 0xff; writeFileSync(opt, b);
  rmSync(join(d6, 'manifest.json'));
  const r = newestValidCheckpoint(out);
  assert.equal(r.checkpoint?.state.step, 4);
  assert.equal(r.checkpoint?.modules[0].A[0], 4, 'the weights are step 4\'s');
  assert.deepEqual(r.skipped.map((s) => s.step), [8, 6]);
  assert.match(r.skipped[0].reason, /optimizer\.safetensors is corrupt/);
  assert.match(r.skipped[1].reason, /not a complete checkpoint \(no manifest\.json\)/);
  // listCheckpoints (complete writes only) does not offer the manifest-less one either
  assert.deepEqual(listCheckpoints(out).map((c) => c.step), [2, 4, 8]);
});

test('a checkpoint the caller refuses (other config) is skipped like a corrupt one; maxStep bounds mid-run recovery', () => {
  const out = join(work, 'accept');
  save(out, 3); save(out, 5, { configHash: 'other' }); save(out, 7);
  const accept = (ck: { state: TrainerState; dir: string }): void => {
    if (ck.state.configHash !== 'c') throw new CheckpointError(`checkpoint ${ck.dir} was written by a job with other training settings`);
  };
  const r = newestValidCheckpoint(out, { accept, maxStep: 6 });
  assert.equal(r.checkpoint?.state.step, 3);
  assert.deepEqual(r.skipped.map((s) => [s.step, /other training settings/.test(s.reason)]), [[5, true]]);
  assert.equal(newestValidCheckpoint(out, { accept }).checkpoint?.state.step, 7);
});

test('no valid checkpoint at all: no checkpoint, every candidate skipped; an empty output_dir: nothing skipped', () => {
  const out = join(work, 'none');
  const d = save(out, 1);
  writeFileSync(join(d, 'trainer_state.json'), '{');
  const r = newestValidCheckpoint(out);
  assert.equal(r.checkpoint, undefined);
  assert.equal(r.skipped.length, 1);
  assert.match(r.skipped[0].reason, /trainer_state\.json is corrupt/);
  assert.deepEqual(newestValidCheckpoint(join(work, 'empty')), { skipped: [] });
});

test('leftover .tmp-PID directories of dead writers are removed on the next start; a live writer\'s are kept', () => {
  const out = join(work, 'temps');
  save(out, 1);
  const root = checkpointRoot(out);
  // a pid that cannot be alive (above Linux's pid_max) and the test runner's (alive: another writer)
  const dead = join(root, 'step-000002.tmp-4194399'), live = join(root, `step-000003.tmp-${process.ppid}`);
  for (const d of [dead, live]) { mkdirSync(join(d, 'adapter'), { recursive: true }); writeFileSync(join(d, 'adapter', 'x'), 'partial'); }
  assert.deepEqual(removeStaleTemps(out), [dead]);
  assert.ok(!existsSync(dead) && existsSync(live));
  rmSync(live, { recursive: true });
});

const root = process.getuid?.() === 0;
test('disk full while writing a checkpoint: a CheckpointError that says so, nothing left behind, older checkpoints intact', { skip: root ? undefined : 'needs root to mount a small tmpfs' }, (t) => {
  const mnt = mkdtempSync(join(tmpdir(), 'dqlora-full-'));
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=96k', 'tmpfs', mnt]);
  if (m.status !== 0) { t.skip(`cannot mount a tmpfs here: ${m.stderr.toString().trim()}`); return; }
  try {
    const out = join(mnt, 'run');
    save(out, 1);
    // fill the volume, leaving a few KiB: the next checkpoint cannot fit
    writeFileSync(join(mnt, 'ballast'), Buffer.alloc(60 * 1024));
    let err: unknown;
    try {
      for (let s = 2; s < 40; s++) save(out, s, { keep: 100 });
    } catch (e) { err = e; }
    assert.ok(err instanceof CheckpointError && err instanceof CheckpointWriteError, `expected a CheckpointError, got ${String(err)}`);
    assert.equal(exitCodeFor(err), EXIT.runtime, 'a full disk is a runtime failure (exit 1), not bad input');
    assert.match((err as Error).message, /cannot write checkpoint step-\d+ in .*: no space left on device/);
    assert.match((err as Error).message, /hint: the disk is full/);
    assert.deepEqual(readdirSync(checkpointRoot(out)).filter((n) => n.includes('.tmp-')), [], 'no temp directory left');
    assert.ok(newestValidCheckpoint(out).checkpoint !== undefined, 'the checkpoints written before are still valid');
  } finally {
    spawnSync('umount', [mnt]);
    rmSync(mnt, { recursive: true, force: true });
  }
});
