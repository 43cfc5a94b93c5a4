// Learning-rate schedules of the Hugging Face Trainer (qlora-spec §9). `s` = optimizer steps already taken, so the
// first update uses multiplier(0): with warmup > 0 that is lr·0, exactly like the Trainer.

export type ScheduleName = 'linear' | 'cosine' | 'constant' | 'constant_with_warmup';

/** Warmup steps: a value < 1 is a fraction of the total (transformers 5.x), rounded up like 4.x's warmup_ratio. */
export function warmupSteps(warmup: number, totalSteps: number): number {
  return warmup > 0 && warmup < 1 ? Math.ceil(warmup * totalSteps) : Math.floor(warmup);
}

export function lrMultiplier(name: ScheduleName, s: number, total: number, warmup: number): number {
  const W = warmup;
  if (name === 'constant') return 1;
  if (s < W) return s / Math.max(1, W);
  switch (name) {
    case 'constant_with_warmup': return 1;
    case 'linear': return Math.max(0, (total - s) / Math.max(1, total - W));
    case 'cosine': {
      const p = (s - W) / Math.max(1, total - W);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * 2 * 0.5 * p)));
    }
  }
}
