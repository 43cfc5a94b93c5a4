// A preempted coordinator (SIGTERM, as the kubelet sends it), with the cpu overlay's coordinator and workers run
// as processes on loopback with the manifests' arguments and environment: the coordinator checkpoints and exits
// 75, the workers exit 75 (not 0: their Indexed Job must not count them done); a new coordinator and new workers
// resume and finish with the adapter of an undisturbed run, bit for bit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml, stringify } from 'yaml';
import { buildK8s, type K8sObject } from '../../deploy/gen/k8s.ts';
import { defaultDeployConfig as cfg, names, ENV } from '../../deploy/gen/config.ts';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { freePort } from '../helpers/nats.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const n = names(cfg);
type Ct = { args: string[]; env: { name: string; value?: string; valueFrom?: { secretKeyRef?: { key: string } } }[] };
const containerOf = (objs: K8sObject[], name: string): Ct =>
  ((objs.find((o) => o.kind === 'Job' && o.metadata.name === name)!.spec as { template: { spec: { containers: Ct[] } } }).template.spec.containers[0]);
const secrets: Record<string, string> = { 'job-token': 'stop-token-0123456789abcdef', 'nats-user': 'dqlora', 'nats-password': 'unused' };
function envOf(ct: Ct, fields: Record<string, string>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const e of ct.env) env[e.name] = e.value ?? (e.valueFrom?.secretKeyRef ? secrets[e.valueFrom.secretKeyRef.key] : fields[e.name]);
  return env;
}

interface Exit { code: number | null; log: string; out: string }

/** The coordinator and S×R workers of one attempt; `onCoordinatorLine` sees the coordinator's stderr lines. */
async function attempt(objs: K8sObject[], jobPath: string, workers: number, onCoordinatorLine?: (l: string, p: ChildProcess) => void): Promise<{ coordinator: Exit; workers: Exit[] }> {
  const job = parseYaml(fs.readFileSync(jobPath, 'utf8')) as { distributed: { listen: string } };
  const control = job.distributed.listen.split(':')[1];
  const base = { PATH: process.env.PATH ?? '', HOME: os.tmpdir(), TMPDIR: os.tmpdir() };
  const run = (bin: string, args: string[], env: Record<string, string>, onLine?: (l: string, p: ChildProcess) => void): Promise<Exit> => {
    const p = spawn(process.execPath, [path.join(root, 'bin', bin), ...args], { cwd: root, env: { ...base, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let log = '', out = '', partial = '';
    p.stdout!.on('data', (d: Buffer) => { log += d.toString(); out += d.toString(); });
    p.stderr!.on('data', (d: Buffer) => {
      log += d.toString();
      partial += d.toString();
      const lines = partial.split('\n');
      partial = lines.pop()!;
      for (const l of lines) onLine?.(l, p);
    });
    return new Promise((res) => p.once('exit', (code) => res({ code, out, log: log.slice(-3000) })));
  };
  const co = containerOf(objs, n.coordinator);
  const coordinator = run('coordinator.js', ['start', '-c', jobPath, ...co.args.slice(3)], { ...envOf(co, {}), [ENV.linger]: '0', DQLORA_LOG_LEVEL: 'info' }, onCoordinatorLine);
  const wo = containerOf(objs, n.worker);
  const ws: Promise<Exit>[] = [];
  for (let i = 0; i < workers; i++) {
    const [pipe, metrics] = [await freePort(), await freePort()];
    const args = wo.args.map((a, k, all) => {
      const flag = all[k - 1];
      if (flag === '--coordinator') return `127.0.0.1:${control}`;
      if (flag === '--listen' || flag === '--advertise') return `127.0.0.1:${pipe}`;
      if (flag === '--metrics-port') return String(metrics);
      return a;
    });
    ws.push(run('worker.js', args, { ...envOf(wo, { JOB_COMPLETION_INDEX: String(i), POD_NAMESPACE: cfg.namespace }), DQLORA_LOG_LEVEL: 'warn' }));
  }
  return { coordinator: await coordinator, workers: await Promise.all(ws) };
}

test('SIGTERM to the coordinator: checkpoint, coordinator and workers exit 75, a restart finishes with the undisturbed adapter', { timeout: 300_000 }, async () => {
  const objs = buildK8s(cfg).rendered.get('cpu')!;
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-deploy-stop-'));
  try {
    const s = tinyExampleSetup(work, { shape: { numLayers: 2 } });
    const job = parseYaml((objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === n.job)!.data as Record<string, string>)['job.yaml']) as Record<string, Record<string, unknown>>;
    const S = job.distributed.stages as number, R = job.distributed.replicas as number;
    const writeJob = async (out: string): Promise<string> => {
      const j = structuredClone(job) as Record<string, unknown> & { distributed: Record<string, unknown>; training: Record<string, unknown>; data: Record<string, unknown> };
      j.model = s.model;
      j.output_dir = path.join(work, out);
      j.data = { ...j.data, train: s.trainPath, validation: s.validationPath, max_length: 48 };
      j.training = { ...j.training, max_steps: 30, micro_batch_size: 2, grad_accum: 2, save_every: 0, eval_every: 0, log_every: 1 };
      j.distributed = { ...j.distributed, listen: `127.0.0.1:${await freePort()}`, metrics_port: -1, heartbeat_timeout_s: 20, wait_timeout_s: 120 };
      const p = path.join(work, `${out}.yaml`);
      fs.writeFileSync(p, stringify(j));
      return p;
    };
    const adapter = (out: string) => createHash('sha256').update(fs.readFileSync(path.join(work, out, 'adapter', 'adapter_model.safetensors'))).digest('hex');

    const whole = await attempt(objs, await writeJob('whole'), S * R);
    assert.equal(whole.coordinator.code, 0, whole.coordinator.log);

    const cutJob = await writeJob('cut');
    let signalled = false;
    const first = await attempt(objs, cutJob, S * R, (line, p) => {
      if (signalled || !line.includes('"msg":"step"') || (JSON.parse(line) as { step: number }).step < 2) return;
      signalled = true;
      p.kill('SIGTERM');
    });
    assert.ok(signalled);
    assert.equal(first.coordinator.code, 75, first.coordinator.log);
    assert.match(first.coordinator.out, /stopped by SIGTERM at step \d+\/30; checkpoint .*step-0000\d\d\nresume with: /);
    assert.deepEqual(first.workers.map((w) => w.code), first.workers.map(() => 75), `workers exit 75 (rejoin), not 0\n${first.workers.map((w) => w.log).join('\n')}`);

    const second = await attempt(objs, cutJob, S * R);
    assert.equal(second.coordinator.code, 0, second.coordinator.log);
    assert.match(second.coordinator.out, /resumed from .*step-0000\d\d at step \d+\/30/);
    assert.deepEqual(second.workers.map((w) => w.code), second.workers.map(() => 0));
    assert.equal(adapter('cut'), adapter('whole'), 'the adapter of the undisturbed run');
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
});
