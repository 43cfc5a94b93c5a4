// Training checkpoints: everything an exact resume needs, written atomically with checksums.
//
//   <output_dir>/checkpoints/step-000120/
//     adapter/                     PEFT adapter (adapter_config.json + adapter_model.safetensors + README.md)
//     optimizer.safetensors        AdamW moments: "<module path>.lora_A.exp_avg" / ".exp_avg_sq", same for lora_B
//     trainer_state.json           step, epoch, histories, the config and data fingerprints
//     manifest.json                sha256 + size of every file above; written last, its presence marks a complete checkpoint
//
// The directory is assembled under a temp name and renamed into place, so a crash leaves either the old set of
// checkpoints or the new one, never a torn one; a checkpoint whose files do not match its manifest is refused.
import { createHash } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { CheckpointError, CheckpointWriteError, DqloraError } from './errors.ts';
import { SafetensorsFile, writeSafetensors, type TensorRecord } from './safetensors.ts';
import { loadAdapter, saveAdapter, type LoraConfig, type LoraTensors } from './peft.ts';

export interface OptimizerMoments {
  readonly path: string;
  readonly mA: Float32Array; readonly vA: Float32Array;
  readonly mB: Float32Array; readonly vB: Float32Array;
  /** DoRA magnitude moments (modules with a lora_magnitude_vector). */
  readonly mMag?: Float32Array; readonly vMag?: Float32Array;
}

export interface TrainerState {
  /** Optimizer steps completed. */
  step: number;
  totalSteps: number;
  stepsPerEpoch: number;
  /** Fingerprints: resuming with another config or dataset is refused. */
  configHash: string;
  dataHash: string;
  history: { step: number; loss: number; lr: number; gradNorm: number; tokens: number }[];
  evalHistory: { step: number; loss: number; perplexity: number }[];
}

export interface Checkpoint {
  readonly dir: string;
  readonly state: TrainerState;
  readonly modules: LoraTensors[];
  readonly moments: OptimizerMoments[];
  readonly loraConfig: LoraConfig;
}

export function checkpointRoot(outputDir: string): string { return join(outputDir, 'checkpoints'); }

function stepDirName(step: number): string { return `step-${String(step).padStart(6, '0')}`; }

function sha256File(path: string): string {
  return createHash('sha256').update(new Uint8Array(readFileSync(path))).digest('hex');
}

function listFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...listFiles(p)); else out.push(p);
  }
  return out.sort();
}

function fsyncDir(dir: string): void {
  try { const fd = openSync(dir, 'r'); fsyncSync(fd); closeSync(fd); } catch { /* not supported everywhere */ }
}

/** The errno code (ENOSPC, EACCES, EROFS, ...) of `e` or of an error in its cause chain. */
function errnoCode(e: unknown): string | undefined {
  for (let x = e, depth = 0; x && typeof x === 'object' && depth < 8; x = (x as { cause?: unknown }).cause, depth++) {
    const code = (x as { code?: unknown }).code;
    if (typeof code === 'string' && /^E[A-Z]+$/.test(code)) return code;
  }
  return undefined;
}

const WRITE_HINTS: Record<string, string> = {
  ENOSPC: 'the disk is full: free space on that volume (or lower training.keep_checkpoints, or point output_dir at a larger volume), then start the job again: it resumes from the newest valid checkpoint',
  EDQUOT: 'the disk quota is exhausted: free space or raise the quota, then start the job again: it resumes from the newest valid checkpoint',
  EROFS: 'the volume is read-only: point output_dir at a writable directory',
  EACCES: 'no permission to write there: fix the directory\'s permissions or point output_dir elsewhere',
  EPERM: 'no permission to write there: fix the directory\'s permissions or point output_dir elsewhere',
};

/** Writes checkpoint `state.step` under outputDir and prunes old ones (keeps `keep`). Returns its directory. */
export function saveCheckpoint(outputDir: string, ck: Omit<Checkpoint, 'dir'>, baseModel: string, keep: number): string {
  const root = checkpointRoot(outputDir);
  const final = join(root, stepDirName(ck.state.step));
  const tmp = `${final}.tmp-${process.pid}`;
  try {
    mkdirSync(root, { recursive: true });
    writeCheckpointDir(tmp, ck, baseModel);
    rmSync(final, { recursive: true, force: true });
    renameSync(tmp, final);
    fsyncDir(root);
  } catch (e) {
    // A failed write leaves nothing behind: the partial directory would only fill the disk further.
    try { rmSync(tmp, { recursive: true, force: true }); } catch { /* the next start removes it */ }
    if (e instanceof CheckpointError) throw e;
    const code = errnoCode(e);
    const why = code === 'ENOSPC' ? 'no space left on device' : (e as Error).message?.split('\n')[0] ?? String(e);
    throw new CheckpointWriteError(`cannot write checkpoint ${stepDirName(ck.state.step)} in ${root}: ${why}${code && !why.includes(code) ? ` (${code})` : ''}`, {
      hint: (code && WRITE_HINTS[code]) ?? 'check that output_dir is on a healthy, writable volume; the job resumes from the newest valid checkpoint when started again',
      cause: e,
    });
  }
  // Prune: keep the newest `keep` complete checkpoints, drop leftovers of crashed writes.
  const all = listCheckpoints(outputDir);
  for (const old of all.slice(0, Math.max(0, all.length - keep))) rmSync(old.dir, { recursive: true, force: true });
  removeStaleTemps(outputDir);
  return final;
}

function writeCheckpointDir(tmp: string, ck: Omit<Checkpoint, 'dir'>, baseModel: string): void {
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  saveAdapter(join(tmp, 'adapter'), ck.modules, ck.loraConfig, baseModel);
  const recs: TensorRecord[] = [];
  for (const m of [...ck.moments].sort((a, b) => a.path.localeCompare(b.path))) {
    const mod = ck.modules.find((x) => x.path === m.path);
    if (!mod) throw new CheckpointError(`optimizer state for '${m.path}' has no matching adapter module`);
    recs.push({ name: `${m.path}.lora_A.exp_avg`, dtype: 'F32', shape: [mod.r, mod.inFeatures], data: m.mA });
    recs.push({ name: `${m.path}.lora_A.exp_avg_sq`, dtype: 'F32', shape: [mod.r, mod.inFeatures], data: m.vA });
    recs.push({ name: `${m.path}.lora_B.exp_avg`, dtype: 'F32', shape: [mod.outFeatures, mod.r], data: m.mB });
    recs.push({ name: `${m.path}.lora_B.exp_avg_sq`, dtype: 'F32', shape: [mod.outFeatures, mod.r], data: m.vB });
    if (m.mMag && m.vMag) {
      recs.push({ name: `${m.path}.lora_magnitude_vector.exp_avg`, dtype: 'F32', shape: [mod.outFeatures], data: m.mMag });
      recs.push({ name: `${m.path}.lora_magnitude_vector.exp_avg_sq`, dtype: 'F32', shape: [mod.outFeatures], data: m.vMag });
    }
  }
  writeSafetensors(join(tmp, 'optimizer.safetensors'), recs, { format: 'dqlora-adamw' });
  writeFileSync(join(tmp, 'trainer_state.json'), JSON.stringify(ck.state, null, 1) + '\n');
  const files: Record<string, { sha256: string; bytes: number }> = {};
  for (const f of listFiles(tmp)) files[relative(tmp, f)] = { sha256: sha256File(f), bytes: statSync(f).size };
  const manifestPath = join(tmp, 'manifest.json');
  writeFileSync(manifestPath, JSON.stringify({ format: 'dqlora-checkpoint/1', step: ck.state.step, files }, null, 1) + '\n');
  const fd = openSync(manifestPath, 'r'); fsyncSync(fd); closeSync(fd);
  fsyncDir(tmp);
}

/**
 * Removes `step-N.tmp-PID` directories left by writes that crashed or failed (a full disk, kill -9), except
 * those of a process that is still alive (another writer on the same output_dir). Returns what it removed.
 * Call once when a job starts; saveCheckpoint also calls it after every successful write.
 */
export function removeStaleTemps(outputDir: string): string[] {
  const root = checkpointRoot(outputDir);
  if (!existsSync(root)) return [];
  const removed: string[] = [];
  for (const e of readdirSync(root)) {
    const m = /\.tmp-(\d+)$/.exec(e);
    if (!m) continue;
    const pid = Number(m[1]);
    if (pid !== process.pid && pidAlive(pid)) continue;
    const p = join(root, e);
    try { rmSync(p, { recursive: true, force: true }); removed.push(p); } catch { /* retried next time */ }
  }
  return removed;
}

function pidAlive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
}

/** Checkpoints with a manifest (complete writes), oldest first. Use newestValidCheckpoint to pick one to resume from. */
export function listCheckpoints(outputDir: string): { dir: string; step: number }[] {
  return listCheckpointDirs(outputDir).filter((c) => existsSync(join(c.dir, 'manifest.json')));
}

/** Every `step-N` directory, complete or not, oldest first. */
export function listCheckpointDirs(outputDir: string): { dir: string; step: number }[] {
  const root = checkpointRoot(outputDir);
  if (!existsSync(root)) return [];
  return readdirSync(root)
    .map((n) => /^step-(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ dir: join(root, m[0]), step: Number(m[1]) }))
    .sort((a, b) => a.step - b.step);
}

/** A checkpoint newestValidCheckpoint passed over, and why (the CheckpointError's first line). */
export interface SkippedCheckpoint { readonly dir: string; readonly step: number; readonly reason: string }

export interface CheckpointChoice {
  /** The newest checkpoint that verified, loaded and was accepted; undefined when none did. */
  readonly checkpoint?: Checkpoint;
  /** Newer checkpoints that were refused, newest first. */
  readonly skipped: SkippedCheckpoint[];
}

/**
 * The newest VALID checkpoint under outputDir — for resume at start and for mid-run recovery. Newest first,
 * each candidate is verified against its manifest (a missing manifest is invalid), loaded, and passed to
 * `accept`, which refuses it by throwing (e.g. a CheckpointError for another config or dataset); refused ones
 * are listed in `skipped` with the reason, for the caller to print. Only `maxStep` and below are considered
 * (mid-run recovery: never a checkpoint from the future of this run). Only named errors (DqloraError:
 * checksum, format, shape) make a candidate invalid; anything else (a bug) propagates.
 */
export function newestValidCheckpoint(outputDir: string, opts: { accept?: (ck: Checkpoint) => void; maxStep?: number } = {}): CheckpointChoice {
  const skipped: SkippedCheckpoint[] = [];
  const candidates = listCheckpointDirs(outputDir).filter((c) => opts.maxStep === undefined || c.step <= opts.maxStep).reverse();
  for (const c of candidates) {
    try {
      const ck = loadCheckpoint(c.dir);
      if (ck.state.step !== c.step) throw new CheckpointError(`checkpoint ${c.dir}: trainer_state.json says step ${ck.state.step}, the directory name says ${c.step}`);
      opts.accept?.(ck);
      return { checkpoint: ck, skipped };
    } catch (e) {
      if (!(e instanceof DqloraError)) throw e;
      skipped.push({ dir: c.dir, step: c.step, reason: e.message.split('\n')[0] });
    }
  }
  return { skipped };
}

/** Verifies every file against the manifest, then loads the checkpoint. */
export function loadCheckpoint(dir: string): Checkpoint {
  const manifestPath = join(dir, 'manifest.json');
  if (!existsSync(manifestPath)) throw new CheckpointError(`${dir} is not a complete checkpoint (no manifest.json)`, { hint: 'it was probably interrupted while being written; use an older checkpoint' });
  let manifest: { files: Record<string, { sha256: string; bytes: number }> };
  try { manifest = JSON.parse(readFileSync(manifestPath, 'utf8')); } catch (e) { throw new CheckpointError(`${manifestPath}: unreadable (${(e as Error).message})`); }
  if (!manifest || typeof manifest !== 'object' || typeof manifest.files !== 'object' || manifest.files === null) throw new CheckpointError(`${manifestPath}: no file list`);
  for (const need of ['trainer_state.json', 'optimizer.safetensors', 'adapter/adapter_config.json', 'adapter/adapter_model.safetensors']) {
    if (!(need in manifest.files)) throw new CheckpointError(`${manifestPath}: does not list ${need}`);
  }
  for (const [name, want] of Object.entries(manifest.files)) {
    if (!want || typeof want !== 'object' || typeof want.sha256 !== 'string' || name.includes('..')) throw new CheckpointError(`${manifestPath}: malformed entry for '${name}'`);
    const p = join(dir, name);
    if (!existsSync(p)) throw new CheckpointError(`checkpoint ${dir}: file ${name} is missing`);
    const got = sha256File(p);
    if (got !== want.sha256) throw new CheckpointError(`checkpoint ${dir}: ${name} is corrupt (sha256 ${got.slice(0, 12)}…, manifest says ${want.sha256.slice(0, 12)}…)`, { hint: 'restore it from a backup or resume from an older checkpoint' });
  }
  const adapter = loadAdapter(join(dir, 'adapter'));
  let state: TrainerState;
  try { state = JSON.parse(readFileSync(join(dir, 'trainer_state.json'), 'utf8')) as TrainerState; } catch (e) { throw new CheckpointError(`checkpoint ${dir}: trainer_state.json is unreadable (${(e as Error).message})`); }
  if (!state || !Number.isInteger(state.step) || state.step < 0 || !Array.isArray(state.history) || !Array.isArray(state.evalHistory)) throw new CheckpointError(`checkpoint ${dir}: trainer_state.json is malformed`);
  const f = SafetensorsFile.open(join(dir, 'optimizer.safetensors'));
  try {
    const moments: OptimizerMoments[] = adapter.modules.map((m) => {
      const get = (k: string): Float32Array => {
        const name = `${m.path}.${k}`;
        if (!f.has(name)) throw new CheckpointError(`checkpoint ${dir}: optimizer state '${name}' is missing`);
        return f.readF32(name);
      };
      const mag = m.magnitude ? { mMag: get('lora_magnitude_vector.exp_avg'), vMag: get('lora_magnitude_vector.exp_avg_sq') } : {};
      return { path: m.path, mA: get('lora_A.exp_avg'), vA: get('lora_A.exp_avg_sq'), mB: get('lora_B.exp_avg'), vB: get('lora_B.exp_avg_sq'), ...mag };
    });
    return { dir, state, modules: adapter.modules, moments, loraConfig: adapter.config };
  } finally {
    f.close();
  }
}

/** A stable fingerprint of JSON-able data. */
export function fingerprint(v: unknown): string {
  return createHash('sha256').update(JSON.stringify(v)).digest('hex').slice(0, 16);
}
