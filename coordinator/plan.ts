// Layer plans: which contiguous layers each pipeline stage holds (embedding on the first, head on the last).
import type { StageSpec } from '../core/model/llama.ts';
import { ConfigError } from '../common/errors.ts';

/** Splits layers into `n` contiguous stages, balanced by layer count (the first stages get the remainder). */
export function splitStages(numLayers: number, n: number): StageSpec[] {
  if (!Number.isInteger(n) || n < 1 || n > numLayers) throw new ConfigError(`distributed.stages = ${n} must be between 1 and the model's ${numLayers} layers`);
  const specs: StageSpec[] = [];
  for (let i = 0, first = 0; i < n; i++) {
    const count = Math.floor(numLayers / n) + (i < numLayers % n ? 1 : 0);
    specs.push({ firstLayer: first, lastLayer: first + count, hasEmbedding: i === 0, hasHead: i === n - 1 });
    first += count;
  }
  return specs;
}
