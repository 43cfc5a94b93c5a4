// Entry of the all-reduce's receive and send threads (see allreduce-serve.ts), as compute-thread.mjs is the compute
// thread's: plain JavaScript so that it loads however the process was started — under `node --import tsx` the
// TypeScript loader reaches this thread already; under bin/worker.js (tsx's register() API, whose hooks do not
// reach worker threads on every Node version) it is registered here. A failed import is cached by specifier, hence
// the query on the second attempt. A bundled build uses allreduce-main.ts instead (bench/multigpu-pack.sh).
let mod;
try {
  mod = await import('./allreduce-serve.ts');
} catch (e) {
  if (e?.code !== 'ERR_UNKNOWN_FILE_EXTENSION') throw e;
  const { register } = await import('tsx/esm/api');
  register();
  mod = await import('./allreduce-serve.ts?loader=tsx');
}
await mod.serve();
