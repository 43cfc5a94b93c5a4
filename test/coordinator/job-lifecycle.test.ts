// Run to completion and stopping, with real `coordinator start` processes on real files:
//   - restarting a finished job (a Kubernetes Job's pod started again) changes no byte and no mtime of its output;
//   - --max-steps above the finished count trains on from the final checkpoint; --fresh starts over;
//   - SIGTERM mid-run: a checkpoint, exit 75, the resume command printed; running it gives the adapter of an
//     undisturbed run, bit for bit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { tinyExampleSetup } from '../helpers/tiny.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

interface Run { code: number | null; out: string; err: string }

function start(args: string[], opts: { onStderr?: (line: string, kill: (sig: NodeJS.Signals) => void) => void } = {}): Promise<Run> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [path.join(root, 'bin', 'coordinator.js'), 'start', ...args], {
      cwd: root, env: { PATH: process.env.PATH ?? '', HOME: os.tmpdir(), DQLORA_LOG_LEVEL: 'info' }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '', err = '', partial = '';
    p.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
    p.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      partial += d.toString();
      const lines = partial.split('\n');
      partial = lines.pop()!;
      for (const l of lines) opts.onStderr?.(l, (sig) => p.kill(sig));
    });
    p.once('exit', (code) => resolve({ code, out, err: err.slice(-4000) }));
  });
}

/** Every file under dir: relative path → sha256 and mtime. */
function snapshot(dir: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const f of fs.readdirSync(dir, { recursive: true }) as string[]) {
    const p = path.join(dir, f);
    const st = fs.statSync(p);
    if (st.isFile()) m.set(f, `${createHash('sha256').update(fs.readFileSync(p)).digest('hex')} ${st.mtimeMs}`);
  }
  return m;
}

const adapterHash = (out: string): string => createHash('sha256').update(fs.readFileSync(path.join(out, 'adapter', 'adapter_model.safetensors'))).digest('hex');

function jobFile(dir: string, steps: number): string {
  const s = tinyExampleSetup(dir, { shape: { numLayers: 2 } });
  const file = path.join(dir, 'job.yaml');
  fs.writeFileSync(file, [
    `model: ${s.model}`, 'output_dir: unused', 'backend: cpu',
    `data: { train: ${s.trainPath}, validation: ${s.validationPath}, max_length: 48 }`,
    `training: { max_steps: ${steps}, micro_batch_size: 4, grad_accum: 2, save_every: 0, lr: 0.001, schedule: cosine }`,
    'lora: { dropout: 0.1 }', '',
  ].join('\n'));
  return file;
}

test('a finished output_dir: a second start says so, exits 0 and changes nothing; --max-steps extends it; --fresh starts over', { timeout: 240_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-finish-'));
  try {
    const job = jobFile(dir, 3);
    const out = path.join(dir, 'out');
    const first = await start(['-c', job, '--output', out, '--no-progress']);
    assert.equal(first.code, 0, first.err);
    const before = snapshot(out);
    assert.ok(before.has('summary.json') && before.has(path.join('adapter', 'adapter_model.safetensors')));

    const again = await start(['-c', job, '--output', out, '--no-progress']);
    assert.equal(again.code, 0, again.err);
    assert.match(again.out, /already holds a finished run: 3\/3 steps.*nothing was changed/s);
    assert.doesNotMatch(again.out, /trained \d+ steps/);
    assert.deepEqual(snapshot(out), before, 'every output byte and mtime unchanged');

    const more = await start(['-c', job, '--output', out, '--no-progress', '--max-steps', '5']);
    assert.equal(more.code, 0, more.err);
    assert.match(more.out, /holds a finished run of 3 steps; --max-steps 5: resuming from .*step-000003 to train 2 more/);
    assert.match(more.out, /trained 2 steps/);
    assert.equal((JSON.parse(fs.readFileSync(path.join(out, 'summary.json'), 'utf8')) as { steps: number }).steps, 5);

    // Half-way changes of the run's length are refused with both lengths named.
    const shorter = await start(['-c', job, '--output', path.join(dir, 'other'), '--no-progress', '--stop-after', '1']);
    assert.equal(shorter.code, 0, shorter.err);
    const changed = await start(['-c', job, '--output', path.join(dir, 'other'), '--no-progress', '--max-steps', '4']);
    assert.equal(changed.code, 1);
    assert.match(changed.err, /belongs to a run of 3 steps \(at step 1\); this job has 4/);

    const fresh = await start(['-c', job, '--output', out, '--no-progress', '--fresh']);
    assert.equal(fresh.code, 0, fresh.err);
    assert.match(fresh.out, /--fresh: training again from step 0/);
    assert.match(fresh.out, /trained 3 steps/);
    // Nothing of the old run (5 steps) is left for a later resume to pick up.
    assert.deepEqual(fs.readdirSync(path.join(out, 'checkpoints')), ['step-000003']);
    const after = await start(['-c', job, '--output', out, '--no-progress']);
    assert.match(after.out, /already holds a finished run: 3\/3 steps/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('SIGTERM mid-run: checkpoint, exit 75, the resume command; resuming gives the undisturbed run\'s adapter bit for bit', { timeout: 300_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-sigterm-'));
  try {
    const steps = 40;
    const job = jobFile(dir, steps);
    const whole = path.join(dir, 'whole');
    const ref = await start(['-c', job, '--output', whole, '--no-progress']);
    assert.equal(ref.code, 0, ref.err);

    const cut = path.join(dir, 'cut');
    let signalledAt = -1;
    const stopped = await start(['-c', job, '--output', cut, '--no-progress'], {
      onStderr: (line, kill) => {
        if (signalledAt >= 0 || !line.includes('"msg":"step"')) return;
        signalledAt = (JSON.parse(line) as { step: number }).step;
        kill('SIGTERM');
      },
    });
    assert.ok(signalledAt >= 1, 'signalled after a step');
    assert.equal(stopped.code, 75, `exit code 75 (stopped, resumable)\n${stopped.err}`);
    const m = /stopped by SIGTERM at step (\d+)\/40; checkpoint (\S+)\nresume with: (.*)\n/.exec(stopped.out);
    assert.ok(m, stopped.out);
    const at = Number(m[1]);
    assert.ok(at >= signalledAt && at < steps, `stopped between steps (${at})`);
    assert.ok(fs.existsSync(path.join(m[2], 'manifest.json')), 'the checkpoint is complete');
    assert.equal(m[3], `npx coordinator start -c ${job} --output ${cut} --no-progress`);
    assert.ok(!fs.existsSync(path.join(cut, 'summary.json')), 'not finished');
    assert.match(stopped.err, /"event":"stop","signal":"SIGTERM"/);

    const resumed = await start(['-c', job, '--output', cut, '--no-progress']);
    assert.equal(resumed.code, 0, resumed.err);
    assert.match(resumed.out, new RegExp(`resumed from .*step-0*${at} at step ${at}/40`));
    assert.equal(adapterHash(cut), adapterHash(whole), 'the same adapter as the undisturbed run');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
