// Container-aware sizing: how many CPU threads and how much memory this process may really use.
//
// `os.availableParallelism()` honours the CPU affinity mask (cpuset) but not a CFS quota, and `os.freemem()`
// reports the node's free memory, not the container's limit. In a Kubernetes pod limited to 4 CPUs on a
// 64-core node the first says 64 (and a 64-thread pool on a 4-CPU quota is throttled every period); with an
// 8 GiB memory limit on a 512 GiB node the second says hundreds of GiB, and the planner would give the worker a
// stage the OOM killer then ends. This module reads the limits of the process's cgroup:
//
//   cgroup v2  (unified):  cpu.max "QUOTA PERIOD" | "max PERIOD";  memory.max bytes | "max";  memory.current;
//                          memory.stat inactive_file
//   cgroup v1:             cpu.cfs_quota_us (-1 = none) / cpu.cfs_period_us;  memory.limit_in_bytes (~2^63 = none);
//                          memory.usage_in_bytes;  memory.stat total_inactive_file
//
// The process's cgroup comes from /proc/self/cgroup, the controller's mount from /proc/self/mountinfo (its root
// and mount point: inside a container the mount root is the container's own cgroup, on a host it is "/"). Limits
// are inherited, so every level from the process's cgroup up to the mount is read and the smallest wins.
// "Used" memory is the working set (usage minus inactive page cache), what the kubelet and the OOM killer count.
// Anything missing or unreadable means "no limit" (not Linux, no cgroup fs): sizing then falls back to `os`.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface ContainerLimits {
  /** 'cgroup2' | 'cgroup1' when a cgroup filesystem was found, else 'none'. */
  readonly source: 'cgroup2' | 'cgroup1' | 'none';
  /** CPU quota in CPUs (quota / period, e.g. 2.5), null when unlimited. */
  readonly cpuQuota: number | null;
  /** Memory limit in bytes, null when unlimited. */
  readonly memoryLimitBytes: number | null;
  /** Working set of the cgroup (usage − inactive file cache), null when unknown. */
  readonly memoryWorkingSetBytes: number | null;
}

export interface ReadOptions {
  /** Filesystem root to read /proc and /sys under (tests point it at a fake tree). Default "/". */
  readonly root?: string;
}

/** cgroup v1 reports "no limit" as the largest page-aligned int64; anything above 2^60 is treated as none. */
const V1_UNLIMITED = 2 ** 60;

interface Mount { root: string; point: string; fstype: string; superOptions: string[] }

function readText(file: string): string | null {
  try { return fs.readFileSync(file, 'utf8'); } catch { return null; }
}

function mounts(root: string): Mount[] {
  const text = readText(path.join(root, 'proc/self/mountinfo'));
  if (!text) return [];
  const out: Mount[] = [];
  for (const line of text.split('\n')) {
    // "36 25 0:32 /kubepods/x /sys/fs/cgroup/memory rw,... shared:15 - cgroup cgroup rw,memory"
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const pre = line.slice(0, sep).split(' ');
    const post = line.slice(sep + 3).split(' ');
    if (pre.length < 5 || post.length < 3) continue;
    out.push({ root: pre[3], point: pre[4], fstype: post[0], superOptions: post[2].split(',') });
  }
  return out;
}

/** /proc/self/cgroup: controller → path ('' for the v2 unified hierarchy). */
function cgroupPaths(root: string): Map<string, string> {
  const map = new Map<string, string>();
  const text = readText(path.join(root, 'proc/self/cgroup'));
  if (!text) return map;
  for (const line of text.split('\n')) {
    const m = /^\d+:([^:]*):(.*)$/.exec(line.trim());
    if (!m) continue;
    if (m[1] === '') map.set('', m[2]);
    else for (const c of m[1].split(',')) map.set(c, m[2]);
  }
  return map;
}

/** The directories of a cgroup from its own up to the controller's mount point, deepest first. */
function levels(root: string, mount: Mount, cgroupPath: string): string[] {
  const point = path.join(root, mount.point);
  let rel = path.posix.relative(mount.root, cgroupPath);
  // Outside the mount's root (a v1 container that shows host paths): only the mount point is ours.
  if (rel.startsWith('..') || !fs.existsSync(path.join(point, rel))) rel = '';
  const dirs: string[] = [];
  for (let r = rel; ; r = path.posix.dirname(r)) {
    dirs.push(path.join(point, r === '.' ? '' : r));
    if (r === '' || r === '.' || r === '/') break;
  }
  return dirs;
}

function minOf(values: (number | null)[]): number | null {
  const v = values.filter((x): x is number => x !== null && Number.isFinite(x) && x > 0);
  return v.length ? Math.min(...v) : null;
}

function statField(text: string | null, key: string): number | null {
  const m = text ? new RegExp(`^${key} (\\d+)$`, 'm').exec(text) : null;
  return m ? Number(m[1]) : null;
}

function readV2(root: string, mount: Mount, cgroupPath: string): ContainerLimits {
  const dirs = levels(root, mount, cgroupPath);
  const cpu = minOf(dirs.map((d) => {
    const t = readText(path.join(d, 'cpu.max'))?.trim().split(/\s+/);
    if (!t || t[0] === 'max' || t.length < 2) return null;
    return Number(t[0]) / Number(t[1]);
  }));
  const mem = minOf(dirs.map((d) => {
    const t = readText(path.join(d, 'memory.max'))?.trim();
    return !t || t === 'max' ? null : Number(t);
  }));
  const current = Number(readText(path.join(dirs[0], 'memory.current'))?.trim() ?? NaN);
  const inactive = statField(readText(path.join(dirs[0], 'memory.stat')), 'inactive_file') ?? 0;
  return { source: 'cgroup2', cpuQuota: cpu, memoryLimitBytes: mem, memoryWorkingSetBytes: Number.isFinite(current) ? Math.max(0, current - inactive) : null };
}

function readV1(root: string, ms: Mount[], paths: Map<string, string>): ContainerLimits {
  const find = (ctl: string) => ms.find((m) => m.fstype === 'cgroup' && m.superOptions.includes(ctl));
  let cpu: number | null = null;
  const cpuMount = find('cpu');
  if (cpuMount && paths.has('cpu')) {
    cpu = minOf(levels(root, cpuMount, paths.get('cpu')!).map((d) => {
      const q = Number(readText(path.join(d, 'cpu.cfs_quota_us'))?.trim() ?? NaN);
      const p = Number(readText(path.join(d, 'cpu.cfs_period_us'))?.trim() ?? NaN);
      return q > 0 && p > 0 ? q / p : null;
    }));
  }
  let mem: number | null = null;
  let ws: number | null = null;
  const memMount = find('memory');
  if (memMount && paths.has('memory')) {
    const dirs = levels(root, memMount, paths.get('memory')!);
    mem = minOf(dirs.map((d) => {
      const v = Number(readText(path.join(d, 'memory.limit_in_bytes'))?.trim() ?? NaN);
      return v > 0 && v < V1_UNLIMITED ? v : null;
    }));
    const usage = Number(readText(path.join(dirs[0], 'memory.usage_in_bytes'))?.trim() ?? NaN);
    const inactive = statField(readText(path.join(dirs[0], 'memory.stat')), 'total_inactive_file') ?? 0;
    ws = Number.isFinite(usage) ? Math.max(0, usage - inactive) : null;
  }
  return { source: 'cgroup1', cpuQuota: cpu, memoryLimitBytes: mem, memoryWorkingSetBytes: ws };
}

/** Reads the CPU quota and memory limit of this process's cgroup (v2, else v1); 'none' when neither is found. */
export function readContainerLimits(opts: ReadOptions = {}): ContainerLimits {
  const root = opts.root ?? '/';
  const none: ContainerLimits = { source: 'none', cpuQuota: null, memoryLimitBytes: null, memoryWorkingSetBytes: null };
  if (process.platform !== 'linux' && opts.root === undefined) return none;
  const ms = mounts(root);
  const paths = cgroupPaths(root);
  // A v1 host may also mount an empty unified hierarchy (systemd's /sys/fs/cgroup/unified): v2 counts only when
  // controllers are attached to it, i.e. no v1 mount carries the cpu or memory controller.
  const v1 = ms.some((m) => m.fstype === 'cgroup' && (m.superOptions.includes('cpu') || m.superOptions.includes('memory')));
  const v2 = ms.find((m) => m.fstype === 'cgroup2');
  if (!v1 && v2 && paths.has('')) return readV2(root, v2, paths.get('')!);
  if (v1) return readV1(root, ms, paths);
  return none;
}

let cached: ContainerLimits | undefined;
/** The limits of this process, read once (a pod's quota and limit do not change while it runs). */
export function containerLimits(): ContainerLimits {
  return (cached ??= readContainerLimits());
}

/**
 * Threads for compute pools: the CPUs this process may run on (affinity), capped by the cgroup CPU quota rounded
 * up (a quota of 2.5 CPUs keeps 3 threads busy without being throttled for long), at least 1.
 */
export function cpuThreads(limits: ContainerLimits = containerLimits(), available = os.availableParallelism()): number {
  const quota = limits.cpuQuota === null ? Infinity : Math.ceil(limits.cpuQuota - 1e-9);
  return Math.max(1, Math.min(available, quota));
}

/** Total memory this process may use: the cgroup limit when below the machine's memory. */
export function totalMemoryBytes(limits: ContainerLimits = containerLimits()): number {
  return Math.min(os.totalmem(), limits.memoryLimitBytes ?? Infinity);
}

/**
 * Free memory for planning: the machine's free memory, capped by what the cgroup limit leaves above the working
 * set. Memory limit and working set are re-read on each call (the usage changes; the files are tiny).
 */
export function freeMemoryBytes(opts: ReadOptions & { limits?: ContainerLimits; hostFree?: number } = {}): number {
  const l = opts.limits ?? (opts.root !== undefined ? readContainerLimits(opts) : limitsNow());
  const hostFree = opts.hostFree ?? os.freemem();
  if (l.memoryLimitBytes === null) return hostFree;
  return Math.max(0, Math.min(hostFree, l.memoryLimitBytes - (l.memoryWorkingSetBytes ?? 0)));
}

/** Fresh working set with the cached limits (the limit itself does not change). */
function limitsNow(): ContainerLimits {
  const l = containerLimits();
  return l.memoryLimitBytes === null ? l : readContainerLimits();
}
