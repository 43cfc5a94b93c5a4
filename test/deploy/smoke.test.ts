// The cpu overlay's containers, run as processes on loopback: the coordinator and stages × replicas workers are
// started with the manifests' own arguments and environment (secrets from a test value, cluster DNS names and
// fixed ports swapped for 127.0.0.1 and free ports, the job.yaml's paths pointed at a tiny model), and the
// job must finish with an adapter. This is the deployment's runtime contract: remote workers (not the local
// launcher), the token from DQLORA_JOB_TOKEN, the flags, /healthz on the metrics ports.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml, stringify } from 'yaml';
import { buildK8s, type K8sObject } from '../../deploy/gen/k8s.ts';
import { defaultDeployConfig as cfg, names, ENV } from '../../deploy/gen/config.ts';
import { writeExampleData, generateExampleData } from '../../coordinator/example/data.ts';
import { writeExampleTokenizer } from '../../coordinator/example/tokenizer.ts';
import { writeRandomLlama } from '../../coordinator/example/model.ts';
import { freePort } from '../helpers/nats.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const n = names(cfg);
type Ct = { args: string[]; env: { name: string; value?: string; valueFrom?: { secretKeyRef?: { key: string } } }[] };
const containerOf = (objs: K8sObject[], kind: string, name: string): Ct =>
  ((objs.find((o) => o.kind === kind && o.metadata.name === name)!.spec as { template: { spec: { containers: Ct[] } } }).template.spec.containers[0]);

/** The container's environment with Secret references resolved from `secrets` and fieldRefs from `fields`. */
function envOf(ct: Ct, secrets: Record<string, string>, fields: Record<string, string>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const e of ct.env) {
    if (e.value !== undefined) env[e.name] = e.value;
    else if (e.valueFrom?.secretKeyRef) env[e.name] = secrets[e.valueFrom.secretKeyRef.key];
    else env[e.name] = fields[e.name];
  }
  return env;
}

test('cpu overlay: coordinator and workers started with the manifests\' arguments and environment train a job', { timeout: 180_000 }, async () => {
  const objs = buildK8s(cfg).rendered.get('cpu')!;
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-deploy-smoke-'));
  const procs: ChildProcess[] = [];
  try {
    // A tiny model and the example data where job.yaml expects /models/..., output where it expects /outputs/...
    const model = path.join(work, 'models', 'base');
    const { trainPath, validationPath } = writeExampleData(path.join(work, 'models', 'data'), 3);
    const { vocabSize } = writeExampleTokenizer(model, generateExampleData(3).train.flatMap((p) => [p.instruction, p.output]));
    const tj = JSON.parse(fs.readFileSync(path.join(model, 'tokenizer.json'), 'utf8')) as { added_tokens: { id: number; content: string }[] };
    const idOf = (c: string): number => tj.added_tokens.find((t) => t.content === c)!.id;
    writeRandomLlama(model, {
      hiddenSize: 32, intermediateSize: 48, numLayers: 2, numHeads: 4, numKvHeads: 2, vocabSize: Math.ceil(vocabSize / 64) * 64,
      maxPositionEmbeddings: 128, tieWordEmbeddings: false, embedStd: 0.125,
      bosTokenId: idOf('<|begin_of_text|>'), eosTokenId: idOf('<|im_end|>'), padTokenId: idOf('<|pad|>'),
    }, 3);

    const [control, coordMetrics] = [await freePort(), await freePort()];
    const job = parseYaml((objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === n.job)!.data as Record<string, string>)['job.yaml']) as Record<string, Record<string, unknown>> & { model: string; output_dir: string };
    const S = job.distributed.stages as number, R = job.distributed.replicas as number;
    assert.equal(R, 1, 'the cpu overlay runs without NATS (replicas 1)');
    // Only what the cluster provides differently changes: paths, addresses, ports, and a short run.
    job.model = model;
    job.output_dir = path.join(work, 'outputs', String(job.name));
    job.data = { ...job.data, train: trainPath, validation: validationPath, max_length: 48 };
    job.training = { ...job.training, max_steps: 2, micro_batch_size: 2, grad_accum: 2, save_every: 0, eval_every: 0 };
    job.distributed = { ...job.distributed, listen: `127.0.0.1:${control}`, metrics_port: coordMetrics, heartbeat_timeout_s: 20, wait_timeout_s: 120 };
    const jobPath = path.join(work, 'job.yaml');
    fs.writeFileSync(jobPath, stringify(job));

    const secrets = { 'job-token': 'smoke-token-0123456789abcdef', 'nats-user': 'dqlora', 'nats-password': 'unused-with-one-replica' };
    const base = { PATH: process.env.PATH ?? '', HOME: os.tmpdir() };
    const logs: string[] = [];
    const start = (bin: string, args: string[], env: Record<string, string>): ChildProcess => {
      const p = spawn(process.execPath, [path.join(root, 'bin', bin), ...args], { cwd: root, env: { ...base, ...env, TMPDIR: os.tmpdir(), DQLORA_LOG_LEVEL: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      p.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
      p.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
      p.on('exit', () => logs.push(`--- ${bin} ${args.join(' ')}\n${out.slice(-3000)}`));
      procs.push(p);
      return p;
    };

    const co = containerOf(objs, 'Job', n.coordinator);
    assert.deepEqual(co.args.slice(0, 2), ['start', '-c']);
    const coordEnv = envOf(co, secrets, {});
    assert.equal(coordEnv[ENV.jobToken], secrets['job-token']);
    // The final metrics linger for the last scrape (45 s in the manifests; a few seconds are enough here).
    assert.ok(Number(coordEnv[ENV.linger]) > 0);
    coordEnv[ENV.linger] = '4';
    const coordinator = start('coordinator.js', ['start', '-c', jobPath, ...co.args.slice(3)], coordEnv);
    const coordExit = new Promise<number | null>((res) => coordinator.once('exit', (code) => res(code)));

    const wo = containerOf(objs, 'Job', n.worker);
    const workerMetrics: number[] = [];
    for (let i = 0; i < S * R; i++) {
      const [pipe, metrics] = [await freePort(), await freePort()];
      workerMetrics.push(metrics);
      const args = wo.args.map((a, k, all) => {
        const flag = all[k - 1];
        if (flag === '--coordinator') return `127.0.0.1:${control}`;
        if (flag === '--listen' || flag === '--advertise') return `127.0.0.1:${pipe}`;
        if (flag === '--metrics-port') return String(metrics);
        return a;
      });
      start('worker.js', args, envOf(wo, secrets, { JOB_COMPLETION_INDEX: String(i), POD_NAMESPACE: cfg.namespace }));
    }
    const workerExits = procs.slice(1).map((p) => new Promise<number | null>((res) => p.once('exit', (c) => res(c))));

    // The probes' endpoint answers on every worker while the job runs.
    for (const port of workerMetrics) {
      let status = 0;
      for (let t = 0; t < 200 && status !== 200; t++) {
        status = await fetch(`http://127.0.0.1:${port}/healthz`).then((r) => r.status, () => 0);
        if (status !== 200) await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(status, 200, `worker /healthz on ${port}`);
    }
    // Readiness turns true once a worker holds its stage (it is false while registering).
    for (const port of workerMetrics) {
      let ready = 0;
      for (let t = 0; t < 2000 && ready !== 200 && coordinator.exitCode === null; t++) {
        ready = await fetch(`http://127.0.0.1:${port}/readyz`).then((r) => r.status, () => 0);
        if (ready !== 200) await new Promise((r) => setTimeout(r, 25));
      }
      assert.equal(ready, 200, `worker /readyz on ${port} once its stage is loaded`);
    }
    // After the end the coordinator still serves its final state: the job succeeded, the last loss is there.
    let final = '';
    while (coordinator.exitCode === null && !/dqlora_job_state\{state="succeeded"[^}]*\} 1/.test(final)) {
      final = await fetch(`http://127.0.0.1:${coordMetrics}/metrics`).then((r) => r.text(), () => '');
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.match(final, /dqlora_job_state\{state="succeeded",dqlora_job="dqlora-finetune"\} 1/, 'the final job state is scrapeable after the end');
    assert.match(final, /^dqlora_train_loss\{dqlora_job="dqlora-finetune"\} \d/m);
    const code = await coordExit;
    assert.equal(code, 0, `coordinator exit code\n${logs.join('\n')}`);
    assert.deepEqual(await Promise.all(workerExits), workerExits.map(() => 0), 'workers exit 0 when told the job is over (their Job indices complete)');
    const adapter = path.join(job.output_dir, 'adapter', 'adapter_model.safetensors');
    const found = fs.existsSync(adapter) || fs.readdirSync(job.output_dir, { recursive: true }).some((f) => String(f).endsWith('adapter_model.safetensors'));
    assert.ok(found, `an adapter was written under ${job.output_dir}\n${logs.join('\n')}`);
  } finally {
    for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    fs.rmSync(work, { recursive: true, force: true });
  }
});
