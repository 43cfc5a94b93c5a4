// Entry of the send thread for bundled deployments (esbuild: bench/multigpu-pack.sh); the source tree uses
// send-thread.mjs. Select it with DQLORA_SEND_ENTRY=<path of the bundle>.
import { serveSender } from './send-thread.ts';

serveSender();
