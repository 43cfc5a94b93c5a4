// A NATS outage shorter than distributed.outage_window_s is ridden out: NATS is down when the job starts (the
// workers' connections are refused), comes up once the coordinator has seen the failure, and a job allowed no
// recoveries at all still finishes — the outage paused it with back-off but used up nothing. Without the window
// the same job gives up.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseJob, type JobConfig } from '../../coordinator/job.ts';
import { runJob } from '../../coordinator/run.ts';
import { Backoff } from '../../common/connection.ts';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { freePort, natsServerMissing } from '../helpers/nats.ts';

const skip = natsServerMissing();

function job(work: string, s: ReturnType<typeof tinyExampleSetup>, out: string, natsUrl: string, windowS: number): JobConfig {
  return parseJob({
    name: 'outage-test', model: s.model, output_dir: join(work, out), backend: 'cpu',
    data: { train: s.trainPath, validation: s.validationPath, max_length: 48 },
    training: { max_steps: 2, micro_batch_size: 2, grad_accum: 1, save_every: 0 },
    distributed: { stages: 1, replicas: 2, workers: 'local', nats_url: natsUrl, heartbeat_timeout_s: 5, step_timeout_s: 30, wait_timeout_s: 60, max_recoveries: 0, outage_window_s: windowS },
  }, 'test', work);
}

test('NATS down at the start for a few seconds: ridden out within the window, no recovery used; without the window, the job gives up', { skip, timeout: 240_000 }, async () => {
  const work = mkdtempSync(join(tmpdir(), 'dqlora-outage-'));
  const s = tinyExampleSetup(work, { shape: { numLayers: 2 } });
  const port = await freePort();
  const url = `nats://127.0.0.1:${port}`;
  writeFileSync(join(work, 'nats.conf'), `listen: "127.0.0.1:${port}"\n`);
  let nats: ReturnType<typeof spawn> | undefined;
  try {
    const lines: string[] = [];
    const print = (l: string): void => {
      lines.push(l);
      // NATS comes back right after the first refused connection reached the coordinator.
      if (!nats && l.startsWith('worker failure')) nats = spawn('nats-server', ['-c', join(work, 'nats.conf')], { stdio: 'ignore' });
    };
    const res = await runJob(job(work, s, 'ridden', url, 120), { print, recoveryBackoff: new Backoff({ initialMs: 1000, maxMs: 2000, jitter: 0 }) });
    assert.equal(res.steps, 2);
    assert.equal(res.recoveries, 0, 'the outage used up no recovery');
    assert.ok(lines.some((l) => l.includes(`cannot reach NATS at ${url}`) && /connection refused/i.test(l)), `the outage was seen, naming the address:\n${lines.join('\n')}`);

    // Same outage, no window: max_recoveries 0 ends the job at the first refused connection.
    await new Promise<void>((r) => { nats!.once('exit', () => r()); nats!.kill('SIGTERM'); });
    nats = undefined;
    await assert.rejects(runJob(job(work, s, 'no-window', url, 0), { print: () => {}, recoveryBackoff: new Backoff({ initialMs: 100, jitter: 0 }) }), /giving up: 1 failure\(s\) within 0\.0 s \(at most 0 recoveries per 600 s\); last failure: .*connection refused/i);
  } finally {
    nats?.kill('SIGKILL');
    rmSync(work, { recursive: true, force: true });
  }
});
