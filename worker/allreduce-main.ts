// Entry of the all-reduce threads for bundled deployments (esbuild: bench/multigpu-pack.sh bundles it as
// .device/allreduce-thread.mjs, next to the bundles that start the threads, where they look for it); the source
// tree uses allreduce-thread.mjs. DQLORA_ALLREDUCE_ENTRY=<path of the bundle> selects it from elsewhere.
import { serve } from './allreduce-serve.ts';

await serve();
