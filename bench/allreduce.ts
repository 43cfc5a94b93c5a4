// All-reduce throughput over NATS vs raw NATS pub/sub throughput, measured in the same run against a
// nats-server started here (127.0.0.1, OS-assigned port, default 1 MiB max_payload).
//   node --import tsx bench/allreduce.ts [--sizes 1,4,16,64] [--ranks 2,4] [--reps 5] [--impl thread,inline] [--payload BYTES] [--max-payload BYTES] [--profile DIR]
// (--impl: thread = ThreadedAllReduce (worker/allreduce-thread.ts, what workers use: receive, send and gather
// threads), thread2 = the same without the gather thread, inline = NatsAllReduce on the rank's own thread; several
// give a row each, run alternately with the raw baseline in the same rounds)
// (--payload: the all-reduce's message size, default the server's max_payload capped at 1 MiB; --max-payload: the server's,
// default nats-server's 1 MiB — the local launcher and the k8s manifests configure 8 MiB; the raw baseline's
// messages are max_payload − 256 bytes either way)
// Every rank runs in its own child process with its own connection, as separate workers would; the raw
// baseline is one publisher process → one subscriber process, the same message size, the same bytes. Columns:
//   algbw = buffer bytes / all-reduce time;  busbw = algbw × 2(R−1)/R (bytes each rank sends — and
//   receives — per byte of buffer, NCCL's convention), which is what to compare with the raw stream. CPU ms per
//   rank (process.cpuUsage inside the call, mean over ranks) shows the work per byte, which a loaded machine
//   does not blur the way it blurs the times; raw CPU ms pub / sub is the same for the baseline's two processes
//   (a rank sends and receives as many bytes as the publisher sends and the subscriber receives). CPU ms main / recv
//   / send / gather: of the threaded rank, its calling thread and its receive, send and gather threads (/proc/thread-self/schedstat).
//   lag p99: the calling thread's event-loop delay during the call (a worker's main thread schedules the pipeline
//   meanwhile), the larger of the ranks'.
import os from 'node:os';
import { fork, type ChildProcess } from 'node:child_process';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { NatsAllReduce, deriveAllReduceKey } from '../worker/allreduce.ts';
import { ThreadedAllReduce } from '../worker/allreduce-thread.ts';
import { threadCpuMs } from '../common/thread-cpu.ts';
import { startNatsServer, natsServerMissing } from '../test/helpers/nats.ts';

const MB = 1 << 20;
/** Wall clock in ms with sub-ms resolution, comparable across processes on one machine. */
const now = (): number => performance.timeOrigin + performance.now();

type Job =
  | { kind: 'rank'; impl: Impl; url: string; jobId: string; rank: number; worldSize: number; floats: number; maxPayload?: number }
  | { kind: 'raw-pub' | 'raw-sub'; url: string; subject: string; bytes: number; msgBytes: number };
type Cmd = { go: number } | { stop: true };
type Impl = 'thread' | 'thread2' | 'inline';

/** Child side: waits for {go: i}, does round i, answers with {done: i, ms, check}. */
async function childMain(job: Job): Promise<void> {
  const nc: NatsConnection = await connect({ servers: job.url });
  const port = {
    on: (ev: 'message', f: (m: Cmd) => void): void => { process.on(ev, f); },
    postMessage: (m: object): void => { process.send!(m); },
    close: (): void => { process.disconnect(); },
  };
  if (job.kind === 'rank') {
    const opts = { jobId: job.jobId, stage: 0, rank: job.rank, worldSize: job.worldSize, timeoutMs: 120_000, key: deriveAllReduceKey('bench-token', job.jobId), maxPayload: job.maxPayload };
    const threaded = job.impl !== 'inline' ? await ThreadedAllReduce.start({ ...opts, url: job.url, gatherThread: job.impl === 'thread' }) : undefined;
    const ar = threaded ?? new NatsAllReduce(nc, opts);
    // Shared, as the compute thread allocates gradient buckets (the threads use it in place).
    const buf = new Float32Array(threaded ? new SharedArrayBuffer(job.floats * 4) : new ArrayBuffer(job.floats * 4));
    const threadMs = async (): Promise<number[]> => [threadCpuMs(), ...(threaded ? await threaded.threadCpuMs() : [])];
    const lag = monitorEventLoopDelay({ resolution: 1 });
    port.on('message', async (m: Cmd) => {
      if ('stop' in m) { ar.close(); if (threaded) await threaded.whenClosed(); await nc.close(); port.close(); return; }
      buf.fill(job.rank + 1);
      const t0 = await threadMs();
      lag.reset(); lag.enable();
      const u0 = process.cpuUsage();
      const start = now();
      await ar.allReduceSum(m.go, buf);
      const end = now(), u = process.cpuUsage(u0);
      lag.disable();
      const lagMs = lag.count > 0 ? lag.percentile(99) / 1e6 : 0;
      const t1 = await threadMs();
      port.postMessage({ done: m.go, start, end, cpuMs: (u.user + u.system) / 1000, threadMs: t1.map((x, i) => x - t0[i]), lagMs, check: buf[0] + buf[buf.length - 1] });
    });
  } else if (job.kind === 'raw-sub') {
    let got = 0, target = 0, round = -1, u0 = process.cpuUsage();
    nc.subscribe(job.subject, { callback: (_e, msg) => {
      got += msg.data.length;
      if (got >= target) {
        const u = process.cpuUsage(u0);
        port.postMessage({ done: round, end: now(), cpuMs: (u.user + u.system) / 1000, check: got });
        got = 0;
      }
    } });
    await nc.flush();
    port.on('message', async (m: Cmd) => {
      if ('stop' in m) { await nc.close(); port.close(); return; }
      round = m.go; target = job.bytes; u0 = process.cpuUsage();
      port.postMessage({ ready: m.go });
    });
  } else {
    const payload = new Uint8Array(job.msgBytes);
    port.on('message', async (m: Cmd) => {
      if ('stop' in m) { await nc.close(); port.close(); return; }
      const u0 = process.cpuUsage();
      const start = now();
      for (let sent = 0; sent < job.bytes; sent += job.msgBytes) nc.publish(job.subject, payload.subarray(0, Math.min(job.msgBytes, job.bytes - sent)));
      await nc.flush();
      const end = now(), u = process.cpuUsage(u0);
      port.postMessage({ done: m.go, start, end, cpuMs: (u.user + u.system) / 1000, check: 0 });
    });
  }
  port.postMessage({ started: true });
}

type Child = ChildProcess & { postMessage(m: Cmd): void };
function spawn(job: Job): Promise<Child> {
  // Under tsx the children need its loader; a bundled .mjs build of this file runs as is.
  // --profile DIR: every child (rank or raw publisher/subscriber) writes a V8 CPU profile there.
  const profDir = arg('profile', '');
  const execArgv = [...(import.meta.url.endsWith('.ts') ? ['--import', 'tsx'] : []), ...(profDir ? ['--cpu-prof', `--cpu-prof-dir=${profDir}`] : [])];
  const c = fork(fileURLToPath(import.meta.url), [], { execArgv, env: { ...process.env, DQLORA_BENCH_CHILD: JSON.stringify(job) } }) as Child;
  c.postMessage = (m: Cmd) => { c.send(m); };
  return new Promise((res, rej) => { c.once('message', () => res(c)); c.once('error', rej); });
}
function next<T>(w: Child, pred: (m: T) => boolean): Promise<T> {
  return new Promise((res) => { const f = (m: unknown): void => { if (pred(m as T)) { w.off('message', f); res(m as T); } }; w.on('message', f); });
}
function median(xs: number[]): number { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; }
function arg(name: string, def: string): string { const i = process.argv.indexOf(`--${name}`); return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : def; }

async function main(): Promise<void> {
  const missing = natsServerMissing();
  if (missing) { console.error(missing); process.exit(1); }
  const sizesMB = arg('sizes', '1,4,16,64').split(',').map(Number);
  const ranksList = arg('ranks', '2,4').split(',').map(Number);
  const reps = Number(arg('reps', '7'));
  const impls = arg('impl', 'thread').split(',') as Impl[];
  for (const im of impls) if (!['thread', 'thread2', 'inline'].includes(im)) throw new Error(`--impl ${im}: expected thread, thread2 or inline`);
  const payloadArg = arg('payload', '');
  // Slow-consumer headroom: one thread may fall behind by a whole 64 MB buffer while others publish.
  const serverMax = arg('max-payload', '');
  const server = await startNatsServer({ maxPayload: serverMax ? Number(serverMax) : undefined, extraConfig: ['max_pending: 1073741824'] });
  const probe = await connect({ servers: server.url });
  const maxPayload = probe.info!.max_payload;
  await probe.close();
  console.log(`# NATS all-reduce vs raw pub/sub — ${new Date().toISOString()} — ${os.cpus()[0]?.model ?? 'cpu'} × ${os.cpus().length} threads, node ${process.version}, nats-server max_payload ${maxPayload}, median of ${reps}`);
  console.log('| buffer | R | impl | raw pub→sub MB/s | all-reduce ms | algbw MB/s | busbw MB/s | busbw / raw | CPU ms per rank | CPU ms main / recv / send / gather | lag p99 ms | raw CPU ms pub / sub |');
  console.log('|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  let seq = 0;
  for (const R of ranksList) {
    for (const mb of sizesMB) {
      const bytes = mb * MB;
      const subject = `bench.raw.${seq}`;
      const sub = await spawn({ kind: 'raw-sub', url: server.url, subject, bytes, msgBytes: maxPayload - 256 });
      const pub = await spawn({ kind: 'raw-pub', url: server.url, subject, bytes, msgBytes: maxPayload - 256 });
      const groups = await Promise.all(impls.map(async (impl) => ({ impl, ranks: await Promise.all(Array.from({ length: R }, (_, rank) =>
        spawn({ kind: 'rank', impl, url: server.url, jobId: `bench${seq}${impl}`, rank, worldSize: R, floats: bytes / 4, maxPayload: payloadArg ? Number(payloadArg) : undefined }))) })));
      seq++;
      const raw: number[] = [], pubCpu: number[] = [], subCpu: number[] = [];
      const per = impls.map(() => ({ ar: [] as number[], cpu: [] as number[], threads: [] as number[][], lag: [] as number[] }));
      for (let i = 0; i < reps + 3; i++) {
        // Baseline and all-reduce alternate so both see the same machine state; rounds 0–2 warm up (JIT).
        const ready = next<{ ready?: number }>(sub, (m) => m.ready === i);
        sub.postMessage({ go: i });
        await ready;
        // Raw: from the publisher's first publish to the subscriber's last byte.
        const rawDone = next<{ done?: number; end: number; cpuMs: number }>(sub, (m) => m.done === i);
        const pubDone = next<{ done?: number; start: number; cpuMs: number }>(pub, (m) => m.done === i);
        pub.postMessage({ go: i });
        const [rawEnd, pubEnd] = [await rawDone, await pubDone];
        const rawMs = rawEnd.end - pubEnd.start;
        if (i >= 3) { raw.push(rawMs); pubCpu.push(pubEnd.cpuMs); subCpu.push(rawEnd.cpuMs); }
        for (const [g, { ranks }] of groups.entries()) {
          // All-reduce: from the moment the last rank entered the call to the last rank leaving it (a rank
          // that enters early just waits; the commands reach the processes a little apart).
          const dones = ranks.map((w) => next<{ done?: number; start: number; end: number; cpuMs: number; threadMs: number[]; lagMs: number; check: number }>(w, (m) => m.done === i));
          for (const w of ranks) w.postMessage({ go: i });
          const res = await Promise.all(dones);
          const arMs = Math.max(...res.map((r) => r.end)) - Math.max(...res.map((r) => r.start));
          const expect = 2 * (R * (R + 1)) / 2;
          for (const r of res) if (r.check !== expect) throw new Error(`wrong all-reduce result ${r.check}, expected ${expect}`);
          if (i >= 3) {
            per[g].ar.push(arMs);
            per[g].cpu.push(res.reduce((s, r) => s + r.cpuMs, 0) / R);
            per[g].lag.push(Math.max(...res.map((r) => r.lagMs)));
            per[g].threads.push(res[0].threadMs.map((_, k) => res.reduce((s, r) => s + r.threadMs[k], 0) / R));
          }
        }
      }
      for (const w of [sub, pub, ...groups.flatMap((g) => g.ranks)]) w.postMessage({ stop: true });
      const rawMBs = mb / (median(raw) / 1000);
      for (const [g, { impl }] of groups.entries()) {
        const t = median(per[g].ar) / 1000;
        const alg = mb / t, bus = alg * 2 * (R - 1) / R;
        const threads = per[g].threads[0].map((_, k) => median(per[g].threads.map((x) => x[k])).toFixed(0)).join(' / ');
        console.log(`| ${mb} MB | ${R} | ${impl} | ${rawMBs.toFixed(0)} | ${(t * 1000).toFixed(1)} | ${alg.toFixed(0)} | ${bus.toFixed(0)} | ${(bus / rawMBs).toFixed(2)} | ${median(per[g].cpu).toFixed(0)} | ${threads} | ${median(per[g].lag).toFixed(1)} | ${median(pubCpu).toFixed(0)} / ${median(subCpu).toFixed(0)} |`);
      }
    }
  }
  await server.stop();
}

const child = process.env.DQLORA_BENCH_CHILD;
if (!child) main().catch((e) => { console.error(e); process.exit(1); });
else childMain(JSON.parse(child) as Job).catch((e) => { console.error(e); process.exit(1); });
