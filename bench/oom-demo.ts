// OOM-safe micro-batches on a 7B-shaped model (issue 13; run by bench/gpu/oom-demo.sh on the GPU machine): a
// requested micro-batch that does not fit is split by the trainer (the step runs again in halves, the gradient
// accumulation doubles) and the run completes with the loss curve of the run that asked for the smaller size, and of
// the run that had room for the whole — what bitsandbytes' paged optimizer is for in the PyTorch QLoRA recipe.
//
// One load of the model (NF4, LoRA r16 α32 dropout 0.05 on all 7 linears, gradient checkpointing), then, each run
// from the same initial adapter and the same data (each step trains the same `micro × grad-accum` sequences of --seq
// random tokens, loss on every token, so the curve falls visibly):
//   part cap  — the pool budget (the allocator's real refusal, as DQLORA_MEM_LIMIT_BYTES) set just above what micro/2
//               needs: (1) micro/2 × 2·GA asked directly, no budget; (2) micro × GA, no budget (it fits the card);
//               (3) micro × GA under the budget: it must split to micro/2. Side-by-side loss curves, peak memory.
//   part auto — under the same budget, `micro_batch_size: auto`'s probe over batch = micro × GA (real forward +
//               backward on --seq-token rows, halving), and 2 steps with what it picked vs run (1).
//   part real — no budget, gradient checkpointing off (the full activations of every layer are kept: the most memory
//               per token, so the card fills within a few steps' time): --real-micro sequences of --real-seq tokens,
//               doubled (one step each) until a step runs out of the device's own memory; that size is then trained
//               --real-steps steps (split by the device's cudaMalloc failure), and the size it settled on is asked
//               directly and compared.
//
//   node oom-demo.mjs --model DIR [--backend cuda|cpu] [--parts cap,auto,real] [--seq 1024] [--micro 16]
//        [--grad-accum 1] [--steps 5] [--real-micro 8] [--real-max 512] [--real-seq 1024] [--real-steps 3]
//        [--json out.json] [--md out.md]
// --backend cpu is a dry run of this script on a tiny model (the cpu backend's budget stands in for the pool's;
// --real-budget BYTES stands in for the card's memory in part real).
import { writeFileSync } from 'node:fs';
import { createCpuBackend, type CpuBackend } from '../core/engine/cpu.ts';
import type { Backend } from '../core/engine/backend.ts';
import type { LoraHostState } from '../core/engine/lora.ts';
import { ModelWeights } from '../common/model-weights.ts';
import { loadModelConfig } from '../core/model/config.ts';
import { loadStageWeights } from '../core/model/loader.ts';
import { LlamaStage, fullModelSpec, type LoraConfig, type StageWeights } from '../core/model/llama.ts';
import { Trainer, type TrainSettings } from '../core/train/trainer.ts';
import { LocalPipeline } from '../core/train/local.ts';
import { autoMicroBatchCandidates, type MicroBatchSplit } from '../core/train/micro-split.ts';
import type { Example } from '../core/train/batch.ts';

const opt = (name: string, dflt?: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  if (i > 0) return process.argv[i + 1];
  if (dflt === undefined) throw new Error(`oom-demo: --${name} is required`);
  return dflt;
};
const modelDir = opt('model'), backendName = opt('backend', 'cuda');
const parts = new Set(opt('parts', 'cap,auto,real').split(','));
const SEQ = Number(opt('seq', '1024')), MICRO = Number(opt('micro', '16')), GA = Number(opt('grad-accum', '1')), STEPS = Number(opt('steps', '5'));
const REAL_MICRO = Number(opt('real-micro', '8')), REAL_MAX = Number(opt('real-max', '512')), REAL_SEQ = Number(opt('real-seq', '1024')), REAL_STEPS = Number(opt('real-steps', '3'));
const REAL_BUDGET = process.argv.includes('--real-budget') ? Number(opt('real-budget')) : undefined;
const GiB = 2 ** 30;
const log = (s: string): void => { process.stdout.write(`[oom-demo] ${s}\n`); };
const gib = (b: number): string => (b >= GiB / 10 ? `${(b / GiB).toFixed(2)} GiB` : `${(b / 2 ** 20).toFixed(1)} MiB`);
if (MICRO % 2 !== 0) throw new Error('oom-demo: --micro must be even (part cap compares it with micro/2)');

// ---- the backend and its memory knobs ----------------------------------------------------------------------
interface Mem { be: Backend; peak(): number; resetPeak(): void; setLimit(bytes: number | undefined): void; settle(): void; device: string }
async function openBackend(): Promise<Mem> {
  if (backendName === 'cpu') {
    const be: CpuBackend = createCpuBackend();
    return { be, peak: () => be.peakMemoryInUse, resetPeak: () => be.resetPeakMemory(), setLimit: (b) => be.setMemoryLimit(b), settle: () => be.releaseCache(), device: 'cpu' };
  }
  const { createCudaBackend } = await import('../core/engine/cuda/cuda.ts');
  const be = createCudaBackend();
  return {
    be, peak: () => be.poolStats().peakInUse, resetPeak: () => be.resetPeak(), setLimit: (b) => be.setMemoryLimit(b),
    settle: () => { be.synchronize(); be.trim(); }, device: `${be.info.name} (${gib(be.info.totalMemory)})`,
  };
}
const mem = await openBackend();
const be = mem.be;

// ---- load once -------------------------------------------------------------------------------------------------
const cfg = loadModelConfig(modelDir);
const lora: LoraConfig = { r: 16, alpha: 32, dropout: 0.05, useRslora: false, targetModules: 'all-linear' };
const spec = fullModelSpec(cfg);
const t0 = performance.now();
const w = ModelWeights.open(modelDir);
let lastPct = -1;
const weights: StageWeights = loadStageWeights(be, cfg, w, spec, {
  lora, seed: 1,
  onProgress: (d, n) => { const p = Math.floor((d / n) * 4); if (p !== lastPct) { lastPct = p; log(`loading ${d}/${n} (${((performance.now() - t0) / 1000).toFixed(1)} s)`); } },
});
w.close();
mem.settle();
const loaded = be.memoryInUse();
log(`${cfg.numLayers} layers × d${cfg.hiddenSize} (ff ${cfg.intermediateSize}, V ${cfg.vocabSize}) loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s on ${mem.device}: ${gib(loaded)} in use`);
// Every stage made below shares these weights and their LoRA params; each run puts the initial adapter back first.
const initial: LoraHostState[] = new LlamaStage(be, cfg, spec, weights).loraParams().map((p) => p.hostState(true));

/** `n` sequences of T random tokens (xorshift), every position a label. */
function examples(n: number, T: number, seed: number): Example[] {
  const out: Example[] = [];
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    const ids = new Int32Array(T);
    for (let t = 0; t < T; t++) { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; ids[t] = s % cfg.vocabSize; }
    out.push({ inputIds: ids, labels: ids, sourceIndex: i });
  }
  return out;
}

interface RunResult { name: string; micro: number; gradAccum: number; seq: number; limit?: number; losses: number[]; splits: MicroBatchSplit[]; finalRows?: number; peak: number; tokensPerSec: number; seconds: number; error?: string }

/** A fresh stage on the shared weights, the LoRA back at its initial state, `steps` optimizer steps. */
function run(name: string, o: { micro: number; gradAccum: number; seq: number; steps: number; limit?: number; data: Example[]; checkpointing?: boolean }): RunResult {
  const stage = new LlamaStage(be, cfg, spec, weights, { gradientCheckpointing: o.checkpointing ?? true });
  stage.loraParams().forEach((p, i) => { p.setHostState(initial[i]); p.zeroGrad(); });
  const settings: TrainSettings = {
    epochs: 1000, maxSteps: o.steps, microBatchSize: o.micro, gradAccum: o.gradAccum, replicas: 1, lr: 2e-4, schedule: 'constant',
    warmupSteps: 0, weightDecay: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1.0, seed: 1, padId: 0,
  };
  const t = new Trainer(be, [stage], o.data, settings, { configHash: 'oom-demo', dataHash: 'oom-demo' });
  const splits: MicroBatchSplit[] = [];
  t.pipeline.onSplit = (s) => { splits.push(s); log(`${name}: step ${s.step}: out of device memory with micro-batches of ${s.fromRows} → ${s.toRows} (${s.fromMicroBatches} → ${s.toMicroBatches} per step): ${s.error}`); };
  mem.settle(); mem.resetPeak();
  mem.setLimit(o.limit);
  const r: RunResult = { name, micro: o.micro, gradAccum: o.gradAccum, seq: o.seq, limit: o.limit, losses: [], splits, peak: 0, tokensPerSec: 0, seconds: 0 };
  const ts = performance.now();
  let tokens = 0;
  try {
    while (!t.done) { const s = t.step(); r.losses.push(s.loss); tokens += s.tokens; }
    mem.settle();
  } catch (e) {
    r.error = String((e as Error).message).split('\n')[0];
    log(`${name}: FAILED ${r.error}`);
    stage.reset();
  } finally {
    mem.setLimit(undefined);
  }
  r.seconds = (performance.now() - ts) / 1000;
  r.tokensPerSec = tokens / r.seconds;
  r.peak = mem.peak();
  r.finalRows = t.pipeline.microBatchRows;
  log(`${name}: ${r.losses.length} steps in ${r.seconds.toFixed(1)} s (${r.tokensPerSec.toFixed(0)} tok/s incl. retries), peak live ${gib(r.peak)}${o.limit ? ` under a budget of ${gib(o.limit)}` : ''}, losses ${r.losses.map((x) => x.toFixed(4)).join(' ')}`);
  return r;
}

const maxRel = (a: number[], b: number[]): number => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]) / Math.abs(b[i])), a.length === b.length ? 0 : Infinity);
const BF16_TOL = 1e-2; // ARCHITECTURE.md: cuda vs cpu, relative error of the loss ≤ 1e-2
const md: string[] = [`# OOM-safe micro-batches — ${cfg.numLayers} layers × d${cfg.hiddenSize}, ff ${cfg.intermediateSize}, V ${cfg.vocabSize}, on ${mem.device}, ${new Date().toISOString().slice(0, 10)}`, ''];
const res: Record<string, unknown> = { device: mem.device, model: { layers: cfg.numLayers, hidden: cfg.hiddenSize, ff: cfg.intermediateSize, vocab: cfg.vocabSize }, loadedBytes: loaded };

const jsonPath = process.argv.includes('--json') ? opt('json') : undefined, mdPath = process.argv.includes('--md') ? opt('md') : undefined;
let printed = 0;
/** Prints the sections written since the last call and rewrites --md / --json: a part cut short by a timeout keeps the earlier ones. */
function flush(): void {
  process.stdout.write(`\n${md.slice(printed).join('\n')}\n`);
  printed = md.length;
  if (mdPath) writeFileSync(mdPath, md.join('\n') + '\n');
  if (jsonPath) writeFileSync(jsonPath, JSON.stringify(res, null, 2));
}

function table(title: string, runs: RunResult[]): void {
  md.push(`## ${title}`, '', `| step | ${runs.map((r) => r.name).join(' | ')} |`, `|---|${runs.map(() => '---').join('|')}|`);
  const n = Math.max(...runs.map((r) => r.losses.length));
  for (let i = 0; i < n; i++) md.push(`| ${i + 1} | ${runs.map((r) => r.losses[i]?.toFixed(5) ?? '–').join(' | ')} |`);
  md.push(`| peak live | ${runs.map((r) => gib(r.peak)).join(' | ')} |`, `| tokens/s | ${runs.map((r) => r.tokensPerSec.toFixed(0)).join(' | ')} |`);
  md.push(`| micro-batch (rows) at the end | ${runs.map((r) => `${r.finalRows ?? r.micro}${r.error ? ` — FAILED: ${r.error}` : ''}`).join(' | ')} |`, '');
  for (const r of runs) for (const s of r.splits) md.push(`- ${r.name}: step ${s.step}: out of device memory at ${s.fromRows} rows → ${s.toRows} (${s.fromMicroBatches} → ${s.toMicroBatches} micro-batches per step): \`${s.error}\``);
  md.push('');
}

// ---- part cap ----------------------------------------------------------------------------------------------------
let capLimit: number | undefined;
let direct: RunResult | undefined;
const data = examples(MICRO * GA, SEQ, 7);
if (parts.has('cap') || parts.has('auto')) {
  direct = run(`${MICRO / 2} × ${2 * GA} asked`, { micro: MICRO / 2, gradAccum: 2 * GA, seq: SEQ, steps: STEPS, data });
  // Just above what micro/2 needs: 3 % of its activation memory, on cuda at least 64 MiB (pool blocks are 2 MiB-rounded).
  capLimit = direct.peak + Math.max(backendName === 'cpu' ? 4096 : 64 * 2 ** 20, Math.ceil(0.03 * (direct.peak - loaded)));
}
if (parts.has('cap')) {
  const whole = run(`${MICRO} × ${GA}, no budget`, { micro: MICRO, gradAccum: GA, seq: SEQ, steps: STEPS, data });
  if (whole.peak <= capLimit!) log(`note: ${MICRO} rows need ${gib(whole.peak)}, not more than the budget ${gib(capLimit!)}: nothing to split`);
  const split = run(`${MICRO} × ${GA} under ${gib(capLimit!)}`, { micro: MICRO, gradAccum: GA, seq: SEQ, steps: STEPS, limit: capLimit, data });
  const vsDirect = maxRel(split.losses, direct!.losses), vsWhole = maxRel(split.losses, whole.losses);
  table(`part cap: seq ${SEQ}, micro-batch ${MICRO} requested under a budget of ${gib(capLimit!)} (${gib(loaded)} of it the model and LoRA state)`, [whole, split, direct!]);
  md.push(`Split run vs ${MICRO / 2} × ${2 * GA} asked directly: max relative loss difference ${vsDirect.toExponential(2)}; vs ${MICRO} rows with room: ${vsWhole.toExponential(2)} (bf16 tolerance ${BF16_TOL}): ${split.splits.length && vsDirect <= BF16_TOL && vsWhole <= BF16_TOL ? '**same loss curve**' : '**NOT shown** (see above)'}.`, '');
  res.cap = { limit: capLimit, runs: [whole, split, direct], maxRelVsDirect: vsDirect, maxRelVsWhole: vsWhole };
  flush();
}

// ---- part auto ---------------------------------------------------------------------------------------------------
if (parts.has('auto')) {
  const stage = new LlamaStage(be, cfg, spec, weights, { gradientCheckpointing: true });
  stage.loraParams().forEach((p, i) => { p.setHostState(initial[i]); p.zeroGrad(); });
  const pipeline = new LocalPipeline(be, [stage], { seed: 1, maxGradNorm: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 });
  mem.settle(); mem.resetPeak(); mem.setLimit(capLimit);
  const ts = performance.now();
  let probe;
  try {
    probe = pipeline.probeMicroBatchRows(autoMicroBatchCandidates(MICRO * GA), SEQ, 0);
  } catch (e) {
    log(`auto: FAILED ${String((e as Error).message).split('\n')[0]}`);
  } finally {
    mem.setLimit(undefined);
  }
  const probeS = (performance.now() - ts) / 1000;
  if (probe) {
    log(`micro_batch_size: auto under ${gib(capLimit!)} with batch_size ${MICRO * GA} at seq ${SEQ} → ${probe.rows} (${probe.tried.map((x) => `${x.rows} ${x.fits ? 'fits' : 'out of memory'}`).join(', ')}; ${probeS.toFixed(1)} s, peak ${gib(mem.peak())})`);
    const auto = run(`auto → ${probe.rows} × ${(MICRO * GA) / probe.rows}`, { micro: probe.rows, gradAccum: (MICRO * GA) / probe.rows, seq: SEQ, steps: Math.min(2, STEPS), limit: capLimit, data });
    const d = maxRel(auto.losses, direct!.losses.slice(0, auto.losses.length));
    md.push(`## part auto`, '', `\`micro_batch_size: auto\`, batch_size ${MICRO * GA}, seq ${SEQ}, budget ${gib(capLimit!)}: **${probe.rows}** (${probe.tried.map((x) => `${x.rows}: ${x.fits ? 'fits' : 'out of memory'}`).join(', ')}; probe ${probeS.toFixed(1)} s). First ${auto.losses.length} steps with it: ${auto.losses.map((x) => x.toFixed(5)).join(', ')} vs ${direct!.losses.slice(0, auto.losses.length).map((x) => x.toFixed(5)).join(', ')} asked directly (max rel ${d.toExponential(2)}).`, '');
    res.auto = { limit: capLimit, probe, probeSeconds: probeS, run: auto, maxRelVsDirect: d };
    flush();
  }
}

// ---- part real ---------------------------------------------------------------------------------------------------
if (parts.has('real')) {
  // The smallest size (doubling from --real-micro) whose first step runs out of the device's memory.
  let rows = REAL_MICRO;
  const sizes: string[] = [];
  for (; rows <= REAL_MAX; rows *= 2) {
    const one = run(`${rows} × 1, 1 step, checkpointing off`, { micro: rows, gradAccum: 1, seq: REAL_SEQ, steps: 1, data: examples(rows, REAL_SEQ, 11), checkpointing: false, limit: REAL_BUDGET });
    sizes.push(`${rows}: ${one.splits.length ? `out of memory → ${one.finalRows}` : `fits (peak ${gib(one.peak)})`}`);
    if (one.error) break;
    if (one.splits.length) break;
  }
  md.push(`## part real: no budget, gradient checkpointing off, ${REAL_SEQ}-token sequences`, '', `Looking for a micro-batch the device cannot hold: ${sizes.join('; ')}.`, '');
  if (rows > REAL_MAX) {
    md.push(`Nothing up to ${REAL_MAX} rows ran out of memory: no split to show (raise --real-max).`, '');
    res.real = { sizes };
  } else {
    const realData = examples(rows, REAL_SEQ, 11);
    const asked = run(`${rows} × 1 requested`, { micro: rows, gradAccum: 1, seq: REAL_SEQ, steps: REAL_STEPS, data: realData, checkpointing: false, limit: REAL_BUDGET });
    const fin = asked.finalRows ?? rows;
    const again = run(`${fin} × ${Math.ceil(rows / fin)} asked`, { micro: fin, gradAccum: Math.ceil(rows / fin), seq: REAL_SEQ, steps: REAL_STEPS, data: realData, checkpointing: false, limit: REAL_BUDGET });
    const d = maxRel(asked.losses, again.losses);
    table(`part real: ${rows} sequences of ${REAL_SEQ} tokens requested, checkpointing off, no budget (the device's own cudaMalloc failure)`, [asked, again]);
    md.push(`Requested ${rows} (split to ${fin}) vs ${fin} × ${Math.ceil(rows / fin)} asked directly: max relative loss difference ${d.toExponential(2)} (bf16 tolerance ${BF16_TOL}): ${asked.splits.length && d <= BF16_TOL ? '**same loss curve**' : '**NOT shown**'}.`, '');
    res.real = { sizes, runs: [asked, again], maxRel: d };
  }
}

flush();
log('done');
