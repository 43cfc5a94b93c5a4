// `worker` command line. `worker info` reports the device a worker would use (backend, memory, native kernels).
// `worker start --coordinator HOST:PORT` (distributed training over gRPC/NATS) arrives with the distributed
// coordinator; until then a job runs in one process with `coordinator start`.
import { Command, Option } from 'commander';
import os from 'node:os';
import { createBackend, type BackendName } from './engine/index.ts';
import { DqloraError } from '../common/errors.ts';

const program = new Command();
program.name('worker').description('dqlora worker: holds pipeline stages of a QLoRA job').showHelpAfterError();

program.command('info')
  .description('show the backend and device this worker would train on')
  .addOption(new Option('--device <name>', 'backend').choices(['cpu', 'cuda', 'auto']).default('auto'))
  .action(async (o: { device: BackendName }) => {
    const be = await createBackend(o.device);
    const info: Record<string, unknown> = { backend: be.name, activationDtype: be.actDtype, hostname: os.hostname(), cpus: os.cpus().length, hostMemoryBytes: os.totalmem() };
    if ('native' in be) info.cpuNativeKernels = (be as { native: unknown }).native ? 'loaded' : 'not built (pure TypeScript kernels)';
    process.stdout.write(JSON.stringify(info, null, 2) + '\n');
  });

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof DqloraError) { process.stderr.write(`error: ${e.message}\n`); process.exit(1); }
  throw e;
}
