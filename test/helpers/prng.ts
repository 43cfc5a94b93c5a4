// Deterministic randomness for tests (fuzzers, random buffers), on top of the project's counter RNG.
import { CounterRng } from '../../common/rng.ts';

export class Philox extends CounterRng {
  constructor(seed: number) {
    super(seed >>> 0, 0x5eed);
  }
  /** `n` uniform random bytes. */
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
  /** Float32 values from N(0, 1) scaled by `scale`. */
  floats(n: number, scale = 1): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = this.normal() * scale;
    return a;
  }
}
