// Distributed step time on the built-in example model (d256 × 4 layers, all-linear LoRA r16): one process vs
// 2 pipeline stages (2 worker processes) vs 2 stages × 2 replicas (4 worker processes + nats-server), all on
// this machine over loopback, the same global batch per optimizer step. Prints one table:
//   step time (median over the measured steps; the first is warm-up), pipeline bubble measured by the workers
//   (idle waiting for the other stage / schedule wall time) vs the 1F1B theory (p−1)/(m+p−1), tensor bytes per
//   step on gRPC (activations + gradients) vs the minimum 2·(p−1)·Σ(B·T)·H·4, and NATS bytes vs the
//   bandwidth-optimal 2(R−1)/R of the LoRA gradient size per rank.
// Measured bytes are tensor payload bytes (what the transports count), without gRPC/NATS framing.
//
//   DQLORA_LOG_LEVEL=warn node --import tsx bench/distributed.ts [--steps 6] [--micro 4] [--mbs 8]
//
// On a 2-core machine the 4 worker processes of the 2×2 layout share 2 cores, so step times there measure
// the overheads, not a speed-up; run it on a machine with ≥ 4 cores per layout for scaling numbers.
//
// Results (2026-11-29, 2-core Xeon VM shared with other jobs, load average ≈ 6; --steps 6 --micro 4):
//   layout                 step ms  bubble  theory  gRPC MiB/step  min   NATS MiB/step  min
//   1 process               756–1645     -       -        -          -        -          -
//   2 stages (2×1)         1029–1641  0.55–0.57 0.111     4.78       4.78     0          0
//   2 × 2                   947–1486  0.54–0.56 0.200     4.79       4.79     2.28       2.28
// Payload bytes equal the minimum (f32 activations/gradients, one NATS send per rank of 2(R−1)/R). The
// measured bubble is far above theory here because the two stages' compute does not run in parallel on
// this contended 2-core box (per-worker compute ≈ half the schedule time each: see the coordinator's
// debug-level "step timings" line); step-time ranges span repeated runs under varying load.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureExampleAssets, exampleJob } from '../coordinator/example/assets.ts';
import { runJob } from '../coordinator/run.ts';

import { buildDataset } from '../coordinator/data/dataset.ts';
import { makeMicroBatch, planSteps } from '../core/train/batch.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { loadModelConfig } from '../core/model/config.ts';
import { linearShape } from '../core/model/loader.ts';
import { LINEAR_MODULES } from '../core/model/llama.ts';

const arg = (name: string, dflt: number): number => { const i = process.argv.indexOf(name); return i > 0 ? Number(process.argv[i + 1]) : dflt; };
const STEPS = arg('--steps', 6), M = arg('--micro', 4), MBS = arg('--mbs', 8);

const assets = ensureExampleAssets(undefined, (s) => process.stderr.write(s + '\n'));
const work = mkdtempSync(join(tmpdir(), 'dqlora-bench-dist-'));
const cfg = loadModelConfig(assets.modelDir);
const r = 16;
const loraParams = cfg.numLayers * LINEAR_MODULES.reduce((a, m) => { const [o, i] = linearShape(cfg, m); return a + r * (o + i); }, 0);

/** The job with `gradAccum` micro-batches per replica; the global batch is MBS × M × 2 in every layout. */
function job(name: string, dist: Record<string, unknown>, gradAccum: number) {
  const j = exampleJob(assets, join(work, name), {
    backend: 'cpu', compare: { prompts: [] },
    training: { max_steps: STEPS, micro_batch_size: MBS, grad_accum: gradAccum, lr: 3e-3, schedule: 'cosine', warmup_steps: 1, seed: 42, resume: false, log_every: 1000 },
    distributed: dist,
  });
  j.data.validation = undefined; j.data.validation_split = 0; // no eval in the timed run
  return j;
}

/** Σ over the measured steps of B·T (tokens incl. padding) per replica layout, for the minimum pipeline bytes. */
function paddedTokens(R: number, gradAccum: number): number[] {
  const tok = loadTokenizer(assets.modelDir);
  const j = job('x', {}, gradAccum);
  const ds = buildDataset({ trainPath: j.data.train, dedup: j.data.dedup, seed: j.training.seed, maxLength: j.data.max_length }, tok);
  const plan: number[][][][] = [];
  for (let epoch = 0; plan.length < STEPS; epoch++) plan.push(...planSteps(ds.train.length, { microBatchSize: MBS, gradAccum, replicas: R, seed: j.training.seed, epoch }));
  return plan.slice(0, STEPS).map((step) => step.flat().reduce((a, ix) => { const mb = makeMicroBatch(ix.map((i) => ds.train[i]), { padId: 0 }); return a + mb.B * mb.T; }, 0));
}

const median = (xs: number[]): number => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
const quiet = (): void => {};
const rows: string[][] = [];
let single = NaN;
const H = cfg.hiddenSize;

// 1 process
{
  const res = await runJob(job('single', {}, 2 * M), { print: quiet });
  single = median(res.timings.slice(1).map((t) => t.seconds));
  rows.push(['1 process', '1×1', (single * 1000).toFixed(0), '1.00', '-', '-', '-', '-', '-', '-', '-']);
}
// 2 stages, then 2 × 2
for (const [S, R] of [[2, 1], [2, 2]] as const) {
  const ga = (2 * M) / R;
  const res = await runJob(job(`p${S}r${R}`, { stages: S, replicas: R, workers: 'local' }, ga), { print: quiet });
  const measured = res.timings.slice(1);
  const tokens = paddedTokens(R, ga).slice(1);
  const minGrpc = tokens.reduce((a, n) => a + 2 * (S - 1) * n * H * 4, 0) / tokens.length;
  const minNats = R > 1 ? 2 * (R - 1) / R * loraParams * 4 * R : 0; // every rank of every stage sends 2(R−1)/R of its share
  const grpc = measured.reduce((a, t) => a + t.grpcBytes, 0) / measured.length;
  const nats = measured.reduce((a, t) => a + t.natsBytes, 0) / measured.length;
  rows.push([
    `${S} stages${R > 1 ? ` × ${R} replicas` : ''}`, `${S}×${R}`, (median(measured.map((t) => t.seconds)) * 1000).toFixed(0), (median(measured.map((t) => t.seconds)) / single).toFixed(2),
    (Math.max(...measured.map((t) => t.eventLoopLagP99)) * 1000).toFixed(1),
    median(measured.map((t) => t.bubble)).toFixed(3), ((S - 1) / (ga + S - 1)).toFixed(3),
    (grpc / 2 ** 20).toFixed(2), (minGrpc / 2 ** 20).toFixed(2), (nats / 2 ** 20).toFixed(2), (minNats / 2 ** 20).toFixed(2),
  ]);
}

const head = ['layout', 'S×R', 'step ms', '× 1 process', 'loop lag p99 ms', 'bubble', 'theory', 'gRPC MiB/step', 'min', 'NATS MiB/step', 'min'];
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
const line = (cells: string[]): string => cells.map((c, i) => c.padStart(widths[i])).join('  ');
process.stdout.write(`example model (H=${H}, ${cfg.numLayers} layers, LoRA r${r} all-linear: ${loraParams} params), micro-batch ${MBS}, ${2 * M} micro-batches per step in total, ${STEPS} steps (first one not measured)\n`);
process.stdout.write(line(head) + '\n' + rows.map(line).join('\n') + '\n');
