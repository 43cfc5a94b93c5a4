// `worker` command line. `worker info` reports the device a worker would use (backend, memory, native kernels).
// `worker start --coordinator HOST:PORT` joins a distributed job: registers, serves its pipeline stage, all-reduces
// LoRA gradients over NATS with the other replicas of its stage, and exits when the job ends.
import { Command, InvalidArgumentError, Option } from 'commander';
import os from 'node:os';
import { containerLimits, cpuThreads, freeMemoryBytes } from '../common/container.ts';
import { createBackend, type BackendName } from '../core/engine/index.ts';
import { runWorker, splitHostPort } from './server.ts';
import { ConfigError, DqloraError, exitCodeFor } from '../common/errors.ts';
import { checkLogLevelEnv } from '../common/log.ts';
import { resolveJobToken } from '../common/job-token.ts';

const program = new Command();
program.name('worker').description('dqlora worker: holds pipeline stages of a QLoRA job').showHelpAfterError();

program.command('info')
  .description('show the backend and device this worker would train on')
  .addOption(new Option('--device <name>', 'backend').choices(['cpu', 'cuda', 'auto']).default('auto'))
  .action(async (o: { device: BackendName }) => {
    const be = await createBackend(o.device);
    const info: Record<string, unknown> = { backend: be.name, activationDtype: be.actDtype, hostname: os.hostname(), cpus: os.cpus().length, hostMemoryBytes: os.totalmem() };
    const limits = containerLimits();
    Object.assign(info, { cgroup: limits.source, cpuQuota: limits.cpuQuota, threads: cpuThreads(limits), memoryLimitBytes: limits.memoryLimitBytes, freeMemoryBytes: freeMemoryBytes() });
    if ('native' in be) info.cpuNativeKernels = (be as { native: unknown }).native ? 'loaded' : 'not built (pure TypeScript kernels)';
    process.stdout.write(JSON.stringify(info, null, 2) + '\n');
  });

const hostPort = (name: string) => (v: string): string => {
  try { splitHostPort(v, name); } catch (e) { throw new InvalidArgumentError((e as Error).message.split('\n')[0]); }
  return v;
};

program.command('start')
  .description('join a distributed job: register with the coordinator and serve the pipeline stage it assigns')
  .requiredOption('--coordinator <host:port>', 'the coordinator\'s control service', hostPort('--coordinator'))
  .option('--nats <url>', 'NATS server for the gradient all-reduce (default: the one the coordinator names)')
  .addOption(new Option('--device <name>', 'backend').choices(['cpu', 'cuda', 'auto']).default('auto'))
  .option('--listen <host:port>', 'address of this worker\'s pipeline server (port 0 = any free port)', hostPort('--listen'), '127.0.0.1:0')
  .option('--advertise <host:port>', 'address other stages dial (default: the listen address)')
  .option('--job-token-file <path>', 'file holding the job\'s token (e.g. a mounted Secret); default: $DQLORA_JOB_TOKEN')
  .option('--job-token <token>', 'deprecated: visible to every user in ps; use --job-token-file or $DQLORA_JOB_TOKEN')
  .option('--metrics-port <port>', 'serve Prometheus /metrics on this port (0 = any free port)', (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError('--metrics-port must be a port number');
    return n;
  })
  .action(async (o: { coordinator: string; nats?: string; device: BackendName; listen: string; advertise?: string; jobToken?: string; jobTokenFile?: string; metricsPort?: number }) => {
    const jobToken = resolveJobToken({ file: o.jobTokenFile, arg: o.jobToken });
    if (!jobToken) throw new ConfigError('no job token: pass --job-token-file PATH or set DQLORA_JOB_TOKEN', { hint: 'use the token the coordinator was given (its --job-token-file / DQLORA_JOB_TOKEN)' });
    const code = await runWorker({ coordinator: o.coordinator, jobToken, device: o.device, listen: o.listen, advertise: o.advertise, natsUrl: o.nats, metricsPort: o.metricsPort });
    process.exit(code);
  });

// A supervisor's SIGTERM ends the worker promptly (the coordinator notices the closed stream at once).
process.on('SIGTERM', () => process.exit(143));

// Exit codes as the coordinator's (README "Exit codes"): 2 usage or config, 3 data, 1 runtime.
try {
  checkLogLevelEnv();
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof DqloraError) { process.stderr.write(`error: ${e.message}\n`); process.exit(exitCodeFor(e)); }
  throw e;
}
