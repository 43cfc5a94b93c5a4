// Multi-GPU layouts of one job (issue 5): the same QLoRA job and global batch on
//   1 process (1×1) | 2 stages × 1 replica | 1 stage × 2 replicas | 2 stages × 2 replicas
// with the local launcher (one worker process per layout slot, CUDA_VISIBLE_DEVICES round-robin over the GPUs,
// a private nats-server for replicas > 1). Prints a markdown table: tokens/s, scaling vs 1×1, peak memory per GPU
// (sampled with nvidia-smi), the workers' measured pipeline bubble vs (p−1)/(m+p−1), and how far each layout's
// adapter is from the 1×1 adapter. On a one-GPU machine the workers share the GPU: that proves the multi-process
// GPU path, not scaling.
//
//   node --import tsx bench/multigpu.ts --model DIR --tokenizer DIR --out DIR [--layouts 1x1,2x1,1x2,2x2]
//        [--steps 4] [--seq 1024] [--global-batch 8] [--micro 2] [--backend cuda]
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseJob } from '../coordinator/job.ts';
import { runJob } from '../coordinator/run.ts';
import { loadAdapter } from '../common/peft.ts';
import { loadTokenizer } from '../common/tokenizer.ts';

const arg = (name: string, dflt?: string): string => {
  const i = process.argv.indexOf(name);
  if (i > 0) return process.argv[i + 1];
  if (dflt === undefined) throw new Error(`${name} is required`);
  return dflt;
};
const model = arg('--model'), tokDir = arg('--tokenizer'), out = arg('--out');
const layouts = arg('--layouts', '1x1,2x1,1x2,2x2').split(',').map((l) => l.split('x').map(Number) as [number, number]);
const STEPS = Number(arg('--steps', '4')), SEQ = Number(arg('--seq', '1024')), GBS = Number(arg('--global-batch', '8'));
const MICRO = Number(arg('--micro', '2')), BACKEND = arg('--backend', 'cuda');

mkdirSync(out, { recursive: true });
for (const f of ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']) {
  if (!existsSync(join(model, f))) copyFileSync(join(tokDir, f), join(model, f));
}
// Long text records (≥ SEQ tokens each, truncated to SEQ): every position is a label, as in the PyTorch bench.
const tok = loadTokenizer(model);
const words = ['拓数派', 'openpie', '数据库', 'cloud', 'storage', 'engine', 'Mochuan', '墨川科技', 'vector', 'query', 'stream', 'Raft'];
const records: string[] = [];
for (let i = 0; i < GBS * (STEPS + 1); i++) {
  let text = '';
  for (let k = 0; tok.encode(text).length < SEQ + 8; k++) text += words[(i * 7 + k * 5) % words.length] + (k % 9 === 0 ? '。' : ' ');
  records.push(JSON.stringify({ text }));
}
const dataPath = join(out, 'data.jsonl');
writeFileSync(dataPath, records.join('\n') + '\n');

/** Samples nvidia-smi every 500 ms; returns the peak MiB per GPU index when stopped. */
function memorySampler(): { stop: () => Promise<Map<string, number>> } {
  const peak = new Map<string, number>();
  const p = spawn('nvidia-smi', ['--query-gpu=index,memory.used', '--format=csv,noheader,nounits', '-lms', '500'], { stdio: ['ignore', 'pipe', 'ignore'] });
  p.stdout.setEncoding('utf8');
  p.stdout.on('data', (chunk: string) => {
    for (const line of chunk.split('\n')) {
      const m = /^\s*(\d+),\s*(\d+)/.exec(line);
      if (m) peak.set(m[1], Math.max(peak.get(m[1]) ?? 0, Number(m[2])));
    }
  });
  let running = true;
  p.on('error', () => { running = false; });   // no nvidia-smi (cpu runs): no memory numbers
  p.on('exit', () => { running = false; });
  return {
    stop: () => new Promise((res) => {
      if (!running || p.pid === undefined) return res(peak);
      p.once('exit', () => res(peak));
      p.kill();
    }),
  };
}

interface Row { detail: string; layout: string; tps: number; seconds: number; peak: Map<string, number>; bubble: string; theory: number; diff: string; loss: number; allreduce: string; idle: string; idleShare: string; noneShare: string; lag: string }

/**
 * Share of a step's schedule during which NO worker had a forward or backward running: 1 − |∪ compute spans| / the
 * longest schedule. The spans are relative to each worker's own step start; the coordinator sends RunStep to all
 * workers at once over loopback, so the starts agree to well under a millisecond. Where the workers share one GPU
 * this is the pipeline's real bubble — the time the device had no work from any stage — while each stage's own
 * waiting share also counts the time the other stage's kernels occupy the device.
 */
function noStageComputingShare(stages: readonly { pipelineSeconds: number; spans?: readonly { kind: string; start: number; end: number }[] }[]): number {
  const iv = stages.flatMap((x) => (x.spans ?? []).filter((sp) => sp.kind === 'forward' || sp.kind === 'backward').map((sp) => [sp.start, sp.end] as const)).sort((a, b) => a[0] - b[0]);
  const wall = Math.max(...stages.map((x) => x.pipelineSeconds));
  let covered = 0, cs = -Infinity, ce = -Infinity;
  for (const [st, en] of iv) {
    if (st > ce) { if (ce > cs) covered += ce - cs; cs = st; ce = en; } else ce = Math.max(ce, en);
  }
  if (ce > cs) covered += ce - cs;
  return wall > 0 ? Math.max(0, 1 - covered / wall) : 0;
}
const rows: Row[] = [];
let ref: Map<string, Float32Array> | undefined;
for (const [S, R] of layouts) {
  const name = `${S}x${R}`;
  const perReplica = GBS / R;
  const job = parseJob({
    name: `mgpu-${name}`, model, output_dir: join(out, `run-${name}`), backend: BACKEND, http_port: -1,
    data: { train: dataPath, max_length: SEQ, dedup: false },
    lora: { r: 16, alpha: 32, dropout: 0, target_modules: 'all-linear' },
    training: { max_steps: STEPS, micro_batch_size: MICRO, grad_accum: Math.max(1, perReplica / MICRO), lr: 1e-4, schedule: 'constant', seed: 1, resume: false, log_every: 1 },
    distributed: S * R === 1 ? { stages: 1, replicas: 1, workers: 0 } : { stages: S, replicas: R, workers: 'local', step_timeout_s: 600 },
  }, 'bench/multigpu', out);
  const sampler = memorySampler();
  const t0 = performance.now();
  const res = await runJob(job, { print: (s) => process.stderr.write(s + '\n') });
  const seconds = (performance.now() - t0) / 1000;
  const peak = await sampler.stop();
  const adapter = new Map(loadAdapter(res.adapterDir).modules.flatMap((m) => [[m.path + '.A', m.A], [m.path + '.B', m.B]] as [string, Float32Array][]));
  let diff = '—';
  if (!ref) ref = adapter;
  else {
    let maxAbs = 0, maxErr = 0;
    for (const [k, v] of ref) { const w = adapter.get(k)!; for (let i = 0; i < v.length; i++) { maxAbs = Math.max(maxAbs, Math.abs(v[i])); maxErr = Math.max(maxErr, Math.abs(v[i] - w[i])); } }
    diff = (maxErr / maxAbs).toExponential(2);
  }
  // Steady state: the first step (allocations, cuBLAS autotuning, connections) is not measured.
  const steady = res.timings.length > 1 ? res.timings.slice(1) : res.timings;
  const med = (xs: number[]): number => { const v = [...xs].sort((a, b) => a - b); return v[Math.floor(v.length / 2)]; };
  const stepSec = med(steady.map((t) => t.seconds));
  const bubbles = steady.map((t) => t.bubble);
  const m = (GBS / R) / MICRO;
  const mean = (xs: (number | undefined)[]): string => { const v = xs.filter((x): x is number => typeof x === 'number'); return v.length ? (1000 * v.reduce((a, b) => a + b, 0) / v.length).toFixed(0) : '—'; };
  // Where a stage's time goes in the median step: compute (forward + backward, as the worker's main thread sees
  // it: includes host copies), waiting on the other stage, all-reduce.
  const medStep = [...steady].sort((a, b) => a.seconds - b.seconds)[Math.floor(steady.length / 2)];
  // The median step's per-worker timelines (seconds from each worker's step start), for a look at where the gaps are.
  if (medStep?.stages) writeFileSync(join(out, `timeline-${name}.json`), JSON.stringify(medStep.stages.map((x) => ({ stage: x.stage, replica: x.replica, spans: x.spans })), null, 1));
  const detail = (medStep?.stages ?? []).map((x) => `s${x.stage}r${x.replica}: fwd ${(1000 * x.forwardSeconds).toFixed(0)} bwd ${(1000 * x.backwardSeconds).toFixed(0)} wait ${(1000 * x.idleSeconds).toFixed(0)} ar ${(1000 * x.allreduceSeconds).toFixed(0)} sched ${(1000 * x.pipelineSeconds).toFixed(0)}`).join('; ');
  rows.push({
    detail, layout: name, tps: (GBS * SEQ) / stepSec, seconds, peak, bubble: S > 1 ? (bubbles.reduce((a, b) => a + b, 0) / bubbles.length).toFixed(3) : '—', theory: S > 1 ? (S - 1) / (m + S - 1) : 0,
    diff, loss: res.lastLoss, allreduce: R > 1 ? mean(steady.map((t) => t.allreduceSeconds)) : '—', idle: S > 1 ? mean(steady.map((t) => t.idleSeconds)) : '—',
    idleShare: S > 1 ? `${(100 * med(steady.map((t) => t.idleSeconds / t.seconds))).toFixed(0)} %` : '—',
    noneShare: S * R > 1 ? `${(100 * med(steady.map((t) => noStageComputingShare(t.stages ?? [])))).toFixed(0)} %` : '—',
    lag: S * R > 1 ? (1000 * Math.max(...steady.map((t) => t.eventLoopLagP99))).toFixed(1) : '—',
  });
  process.stderr.write(`${name}: ${((GBS * SEQ) / stepSec).toFixed(0)} tokens/s (median step ${(stepSec * 1000).toFixed(0)} ms)\n`);
}
const base = rows[0]?.tps ?? 1;
const lines = [
  `Multi-GPU layouts — ${new Date().toISOString().slice(0, 10)}; model ${model}; seq ${SEQ}, global batch ${GBS} sequences, micro-batch ${MICRO}, ${STEPS} steps, backend ${BACKEND}`,
  'tokens/s from the median step time of steps 2..N (the first step warms up); worker event-loop lag = highest p99 of any worker in any measured step.',
  'waiting share = one stage\'s gaps between its own compute spans (on a shared GPU this includes the other stage\'s kernels); no stage computing = time no worker had a forward or backward running (union over workers), median over steps.',
  '', '| layout (stages×replicas) | tokens/s | vs 1×1 | peak MiB per GPU | bubble measured | bubble theory | all-reduce ms/step | waiting on other stages ms/step | waiting share of step | no stage computing, share of schedule | worker loop lag p99 ms | adapter max rel. diff vs 1×1 | last loss |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ...rows.map((r) => `| ${r.layout} | ${r.tps.toFixed(0)} | ${(r.tps / base).toFixed(2)}× | ${[...r.peak].map(([g, v]) => `${g}: ${v}`).join(', ') || '—'} | ${r.bubble} | ${r.theory.toFixed(3)} | ${r.allreduce} | ${r.idle} | ${r.idleShare} | ${r.noneShare} | ${r.lag} | ${r.diff} | ${r.loss.toFixed(4)} |`),
  '', 'Per stage replica in the median step (ms):', '',
  ...rows.filter((r) => r.detail).map((r) => `- ${r.layout}: ${r.detail}`),
];
writeFileSync(join(out, 'multigpu.md'), lines.join('\n') + '\n');
process.stdout.write(lines.join('\n') + '\n');
process.exit(0);
