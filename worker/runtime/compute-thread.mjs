// Entry of the stage's compute thread (see compute.ts). Plain JavaScript so that it loads however the process was
// started: under `node --import tsx` the TypeScript loader reaches this thread already; under bin/worker.js (tsx's
// register() API, whose hooks do not reach worker threads on every Node version) it is registered here. A failed
// import is cached by specifier, hence the query on the second attempt.
let mod;
try {
  mod = await import('./compute.ts');
} catch (e) {
  if (e?.code !== 'ERR_UNKNOWN_FILE_EXTENSION') throw e;
  const { register } = await import('tsx/esm/api');
  register();
  mod = await import('./compute.ts?loader=tsx');
}
mod.serve();
