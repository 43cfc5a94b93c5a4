// Stage-to-stage tensor transfer: worker/transport/pipeline.ts (gRPC over loopback HTTP/2) vs a raw TCP socket,
// measured in the same run, alternating, on the same machine state.
//   node --import tsx bench/transport.ts [--sizes 16,64] [--reps 7] [--chunk BYTES] [--inflight 1,4] [--profile DIR]
// The sender runs in a child process and the receiver here, as two stages are two processes. One transfer =
// from the sender starting to send one float32 tensor to the sender holding the receiver's ack, the receiver
// having the whole tensor in one contiguous array (gRPC: validated, checksummed, reassembled; raw TCP: a
// 4-byte length, the bytes, a 1-byte ack — no framing, no checks: the upper bound of what loopback carries).
// With --inflight k > 1, k tensors of the same size are sent back to back without awaiting acks (the
// sender's maxInFlight), and the time is to the last ack. The CPU columns (process.cpuUsage of each side,
// per transfer) show the work per byte, which is what limits loopback and what a loaded machine does not blur.
// The last column: the longest event-loop stall (monitorEventLoopDelay, 1 ms resolution) on each side during a gRPC
// transfer, median over the rounds — what a worker's loop-lag metric sees of the transport.
// "worker threads": the same gRPC transport as a worker runs it — PipelineSender (send thread) to PipelineReceiver
// (receive thread), host arrays taken from and given back to pools as the compute thread does (CPU columns: the
// whole process, all threads).
import net from 'node:net';
import http2 from 'node:http2';
import os from 'node:os';
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { crc32 } from '../wire/tensor.ts';
import { PipelineSender } from '../worker/transport/send-thread.ts';
import { PipelineReceiver } from '../worker/transport/receive-thread.ts';
import { BufferPool } from '../common/buffer-pool.ts';
import { MessageChannel } from 'node:worker_threads';
import { startPipelineServer, PipelineClient, PIPELINE_DEFAULT_CHUNK_BYTES, PIPELINE_FLOW_CONTROL_WINDOW } from '../worker/transport/pipeline.ts';

const MB = 1 << 20;
const now = (): number => performance.timeOrigin + performance.now();

type Job = { grpc: string; stage: string; tcpPort: number; h2Port: number; chunk: number };
/** grpc: PipelineClient → startPipelineServer on the calling threads; stage: the worker's send thread → receive thread. */
type Kind = 'grpc' | 'stage' | 'tcp' | 'h2';
type Sample = [wallMs: number, sendCpuMs: number, receiveCpuMs: number, sendLagMs: number, receiveLagMs: number];
type Cmd = { kind: Kind; round: number; bytes: number; inflight: number } | { stop: true };
type Reply = { round: number; start: number; end: number; cpuMs: number; lagMs: number };
/** Event-loop delay of this process during one transfer (1 ms timer resolution): its longest stall, in ms. */
const loopLag = monitorEventLoopDelay({ resolution: 1 });
const lagStart = (): void => { loopLag.reset(); loopLag.enable(); };
const lagEnd = (): number => { loopLag.disable(); return loopLag.count > 0 ? loopLag.max / 1e6 : 0; };

async function childMain(job: Job): Promise<void> {
  const client = new PipelineClient(job.grpc, { jobId: 'bench', jobToken: 'bench-token', chunkBytes: job.chunk, deadlineMs: 120_000 });
  // Plain HTTP/2 (Node's http2, no gRPC): the same windows as the pipeline transport, one stream per tensor,
  // written in `chunk`-byte writes — what any transport on Node's HTTP/2 could reach.
  const h2 = http2.connect(`http://127.0.0.1:${job.h2Port}`, { settings: { initialWindowSize: PIPELINE_FLOW_CONTROL_WINDOW } });
  h2.on('connect', () => h2.setLocalWindowSize(PIPELINE_FLOW_CONTROL_WINDOW));
  const h2Send = (data: Uint8Array): Promise<void> => new Promise((res, rej) => {
    const req = h2.request({ ':method': 'POST', ':path': '/t' });
    req.on('error', rej);
    req.on('data', () => {});
    req.on('end', () => res());
    let off = 0;
    const pump = (): void => {
      while (off < data.length) {
        const ok = req.write(data.subarray(off, off + job.chunk));
        off += job.chunk;
        if (!ok) { req.once('drain', pump); return; }
      }
      req.end();
    };
    pump();
  });
  // The worker's path: a send thread whose sent arrays come back (after the ack) to a pool, as a compute thread's
  // downloads do; the payload is copied into a pooled array before the timed send, as the download would write it.
  const sender = new PipelineSender();
  await sender.open('next', job.stage, { jobId: 'bench', jobToken: 'bench-token', chunkBytes: job.chunk, deadlineMs: 120_000, maxInFlight: 4 });
  const sendPool = new BufferPool(16, 1 << 30);
  const back = new MessageChannel();
  back.port1.on('message', (b: ArrayBuffer) => sendPool.give(b));
  back.port1.unref();
  await sender.recycleTo(back.port2);
  const sock = net.connect(job.tcpPort, '127.0.0.1');
  sock.setNoDelay(true);
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const payloads = new Map<number, { data: Float32Array; crc: number }>();
  // The checksum is taken once per payload, outside the timed transfer, as a worker's compute thread takes it
  // where the tensor is made (worker/runtime/compute.ts); the receiver still checks every byte.
  const payload = (bytes: number): { data: Float32Array; crc: number } => {
    let p = payloads.get(bytes);
    if (!p) {
      const data = new Float32Array(bytes / 4);
      for (let i = 0; i < data.length; i++) data[i] = (i % 1000) * 0.5;
      p = { data, crc: crc32(new Uint8Array(data.buffer)) };
      payloads.set(bytes, p);
    }
    return p;
  };
  let step = 0;
  process.on('message', async (m: Cmd) => {
    if ('stop' in m) { client.close(); await sender.close(); sock.destroy(); h2.close(); process.disconnect(); return; }
    const { data, crc } = payload(m.bytes);
    const staged = m.kind === 'stage' ? Array.from({ length: m.inflight }, () => { const a = new Float32Array(sendPool.take(m.bytes)); a.set(data); return a; }) : [];
    const u0 = process.cpuUsage();
    lagStart();
    const start = now();
    if (m.kind === 'grpc') {
      const s = step++;
      await Promise.all(Array.from({ length: m.inflight }, (_, i) => client.sendForward(s, i, data, [data.length], { crc32: crc })));
    } else if (m.kind === 'stage') {
      const s = step++;
      await Promise.all(staged.map((a, i) => sender.send('next', 'forward', s, i, a, [a.length], 'f32', crc)));
    } else if (m.kind === 'h2') {
      const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      await Promise.all(Array.from({ length: m.inflight }, () => h2Send(bytes)));
    } else {
      const acks = new Promise<void>((res) => {
        let got = 0;
        const f = (b: Buffer): void => { got += b.length; if (got >= m.inflight) { sock.off('data', f); res(); } };
        sock.on('data', f);
      });
      for (let i = 0; i < m.inflight; i++) {
        const len = Buffer.alloc(4);
        len.writeUInt32LE(m.bytes);
        sock.write(len);
        sock.write(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      }
      await acks;
    }
    const end = now();
    const u = process.cpuUsage(u0);
    process.send!({ round: m.round, start, end, cpuMs: (u.user + u.system) / 1000, lagMs: lagEnd() } satisfies Reply);
  });
  process.send!({ started: true });
}

/** Raw TCP receiver: [u32 length][bytes] per tensor into one preallocated array, 1 byte back when complete. */
function startTcpSink(): Promise<{ port: number; close(): void }> {
  const server = net.createServer((s) => {
    s.setNoDelay(true);
    let need = -1, got = 0, header = Buffer.alloc(0);
    let dst = new Uint8Array(0);
    s.on('data', (b: Buffer) => {
      let off = 0;
      while (off < b.length) {
        if (need < 0) {
          header = Buffer.concat([header, b.subarray(off, off + 4 - header.length)]);
          off += Math.min(4, b.length - off);
          if (header.length < 4) continue;
          need = header.readUInt32LE(0);
          header = Buffer.alloc(0);
          if (dst.length !== need) dst = new Uint8Array(need);
          got = 0;
        }
        const take = Math.min(need - got, b.length - off);
        dst.set(b.subarray(off, off + take), got);
        got += take; off += take;
        if (got === need) { need = -1; s.write(Buffer.from([1])); }
      }
    });
  });
  return new Promise((res) => server.listen(0, '127.0.0.1', () => res({ port: (server.address() as net.AddressInfo).port, close: () => server.close() })));
}

/** Plain HTTP/2 receiver: each stream's body into one array of the announced size, "ok" back when complete. */
function startH2Sink(): Promise<{ port: number; close(): void }> {
  const server = http2.createServer({ settings: { initialWindowSize: PIPELINE_FLOW_CONTROL_WINDOW } });
  server.on('session', (ss) => ss.setLocalWindowSize(PIPELINE_FLOW_CONTROL_WINDOW));
  server.on('stream', (st) => {
    const parts: Buffer[] = [];
    let got = 0;
    st.on('data', (b: Buffer) => { parts.push(b); got += b.length; });
    st.on('end', () => {
      // The reassembly the gRPC path does too: one contiguous array.
      const dst = new Uint8Array(got);
      let off = 0;
      for (const p of parts) { dst.set(p, off); off += p.length; }
      st.respond({ ':status': 200 });
      st.end('ok');
    });
  });
  return new Promise((res) => server.listen(0, '127.0.0.1', () => res({ port: (server.address() as net.AddressInfo).port, close: () => server.close() })));
}

function arg(name: string, def: string): string { const i = process.argv.indexOf(`--${name}`); return i >= 0 && process.argv[i + 1] ? process.argv[i + 1] : def; }
function median(xs: number[]): number { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; }

async function main(): Promise<void> {
  const sizes = arg('sizes', '16,64').split(',').map(Number);
  const reps = Number(arg('reps', '7'));
  const chunk = Number(arg('chunk', String(PIPELINE_DEFAULT_CHUNK_BYTES)));
  const inflights = arg('inflight', '1').split(',').map(Number);
  const server = await startPipelineServer({ jobId: 'bench', jobToken: 'bench-token', maxMessageBytes: Math.max(chunk, PIPELINE_DEFAULT_CHUNK_BYTES), onForward: () => {}, onBackward: () => {} });
  // The worker's receive thread, with its pool of arrays fed back as a compute thread does once a tensor is on the device.
  const given = new MessageChannel();
  const stage = await PipelineReceiver.start({
    host: '127.0.0.1', port: 0, jobId: 'bench', jobToken: 'bench-token', maxMessageBytes: Math.max(chunk, PIPELINE_DEFAULT_CHUNK_BYTES), recycle: given.port2,
    onTensor: (_d, _s, _m, t) => { const b = t.data.buffer; if (b instanceof ArrayBuffer) given.port1.postMessage(b, [b]); },
  });
  const tcp = await startTcpSink();
  const h2s = await startH2Sink();
  // --profile DIR: the sender (child) writes a V8 CPU profile there (run this process with --cpu-prof for the receiver).
  const profDir = arg('profile', '');
  const execArgv = [...(import.meta.url.endsWith('.ts') ? ['--import', 'tsx'] : []), ...(profDir ? ['--cpu-prof', `--cpu-prof-dir=${profDir}`] : [])];
  const child = fork(fileURLToPath(import.meta.url), [], { execArgv, env: { ...process.env, DQLORA_BENCH_CHILD: JSON.stringify({ grpc: server.address, stage: stage.address, tcpPort: tcp.port, h2Port: h2s.port, chunk } satisfies Job) } }) as ChildProcess;
  await new Promise<void>((r) => child.once('message', () => r()));
  let round = 0;
  /** One transfer: wall ms, sender CPU ms, receiver (this process) CPU ms, longest event-loop stall ms sender, receiver. */
  const once = (kind: Kind, bytes: number, inflight: number): Promise<Sample> => new Promise((res) => {
    const r = round++;
    const u0 = process.cpuUsage();
    lagStart();
    const f = (m: Reply): void => {
      if (m.round !== r) return;
      child.off('message', f);
      const u = process.cpuUsage(u0);
      res([m.end - m.start, m.cpuMs, (u.user + u.system) / 1000, m.lagMs, lagEnd()]);
    };
    child.on('message', f);
    child.send({ kind, round: r, bytes, inflight } satisfies Cmd);
  });
  console.log(`# pipeline transport vs raw TCP — ${new Date().toISOString()} — ${os.cpus()[0]?.model ?? 'cpu'} × ${os.cpus().length}, load ${os.loadavg()[0].toFixed(1)}, node ${process.version}, chunk ${chunk} B, median of ${reps}`);
  console.log('| tensor | in flight | raw TCP MB/s | HTTP/2 MB/s | gRPC MB/s | HTTP/2 / raw | gRPC / raw | CPU ms send / receive, raw | HTTP/2 | gRPC | gRPC longest loop stall ms send / receive | gRPC, worker threads MB/s | / raw | CPU ms send / receive |');
  console.log('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const inflight of inflights) {
    for (const mb of sizes) {
      const bytes = mb * MB;
      const g: Sample[] = [], t: Sample[] = [], h: Sample[] = [], st: Sample[] = [];
      for (let i = 0; i < reps + 2; i++) {
        const tm = await once('tcp', bytes, inflight);
        const hm = await once('h2', bytes, inflight);
        const gm = await once('grpc', bytes, inflight);
        const sm = await once('stage', bytes, inflight);
        if (i >= 2) { t.push(tm); h.push(hm); g.push(gm); st.push(sm); } // rounds 0–1 warm up (JIT, connection, windows, pools)
      }
      const col = (xs: Sample[], k: number): number => median(xs.map((x) => x[k]));
      const mbs = (xs: Sample[]): number => (mb * inflight) / (col(xs, 0) / 1000);
      const cpu = (xs: Sample[]): string => `${col(xs, 1).toFixed(0)} / ${col(xs, 2).toFixed(0)}`;
      const rawMBs = mbs(t), h2MBs = mbs(h), grpcMBs = mbs(g), stageMBs = mbs(st);
      console.log(`| ${mb} MiB | ${inflight} | ${rawMBs.toFixed(0)} | ${h2MBs.toFixed(0)} | ${grpcMBs.toFixed(0)} | ${(h2MBs / rawMBs).toFixed(2)} | ${(grpcMBs / rawMBs).toFixed(2)} | ${cpu(t)} | ${cpu(h)} | ${cpu(g)} | ${col(g, 3).toFixed(1)} / ${col(g, 4).toFixed(1)} | ${stageMBs.toFixed(0)} | ${(stageMBs / rawMBs).toFixed(2)} | ${cpu(st)} |`);
    }
  }
  child.send({ stop: true });
  tcp.close();
  h2s.close();
  await stage.close();
  await server.close();
  if (server.stats.rejected) throw new Error(`${server.stats.rejected} transfers were rejected`);
}

const childJob = process.env.DQLORA_BENCH_CHILD;
if (!childJob) main().catch((e) => { console.error(e); process.exit(1); });
else childMain(JSON.parse(childJob) as Job).catch((e) => { console.error(e); process.exit(1); });
