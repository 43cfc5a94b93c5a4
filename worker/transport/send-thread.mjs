// Entry of the worker's send thread (see send-thread.ts). Plain JavaScript so that it loads however the process was
// started — the same bootstrap as worker/runtime/compute-thread.mjs: under `node --import tsx` the TypeScript loader
// reaches this thread already; under bin/worker.js (tsx's register() API) it is registered here.
let mod;
try {
  mod = await import('./send-thread.ts');
} catch (e) {
  if (e?.code !== 'ERR_UNKNOWN_FILE_EXTENSION') throw e;
  const { register } = await import('tsx/esm/api');
  register();
  mod = await import('./send-thread.ts?loader=tsx');
}
mod.serveSender();
