// Entry of the worker's transport threads (send-thread.ts, receive-thread.ts; `workerData.role` says which). Plain
// JavaScript so that it loads however the process was started — the bootstrap of worker/runtime/compute-thread.mjs:
// under `node --import tsx` the TypeScript loader reaches this thread already; under bin/worker.js (tsx's register()
// API) it is registered here. A failed import is cached by specifier, hence the query on the second attempt.
import { workerData } from 'node:worker_threads';

const file = workerData?.role === 'receive' ? './receive-thread.ts' : './send-thread.ts';
let mod;
try {
  mod = await import(file);
} catch (e) {
  if (e?.code !== 'ERR_UNKNOWN_FILE_EXTENSION') throw e;
  const { register } = await import('tsx/esm/api');
  register();
  mod = await import(`${file}?loader=tsx`);
}
if (workerData?.role === 'receive') mod.serveReceiver(); else mod.serveSender();
