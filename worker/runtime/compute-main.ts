// Entry of the compute thread for bundled deployments (esbuild: bench/multigpu-pack.sh); the source tree uses
// compute-thread.mjs. Select it with DQLORA_COMPUTE_ENTRY=<path of the bundle>.
import { serve } from './compute.ts';

serve();
