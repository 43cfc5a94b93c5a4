// Entry of the transport threads for bundled deployments (esbuild: bench/multigpu-pack.sh); the source tree uses
// thread.mjs. Select it with DQLORA_TRANSPORT_ENTRY=<path of the bundle>; `workerData.role` picks the thread.
import { workerData } from 'node:worker_threads';
import { serveSender } from './send-thread.ts';
import { serveReceiver } from './receive-thread.ts';

if ((workerData as { role?: string } | null)?.role === 'receive') serveReceiver(); else serveSender();
