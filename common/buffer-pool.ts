// A small pool of large host arrays, reused by exact size. A fresh multi-megabyte ArrayBuffer costs its first
// touch of every page (the kernel maps and zeroes them: ~30–45 ms for 64 MiB here, 4 ms to overwrite a reused one),
// and the worker makes one per activation it downloads and one per tensor it receives — on the critical path of
// every pipeline hop. The stage gives the arrays back when it is done with them (after the upload to the device, or
// after the receiver's ack) and the next tensor of the same size reuses one. Sizes that do not repeat just miss.
// Contents of a reused array are stale: every user overwrites all of it.

/**
 * The memory behind `a` when `a` spans all of it: what may move to another thread (transfer) or back into a pool
 * without taking sibling views along. undefined for a view into a larger buffer (a Node Buffer pool slice, a chunk).
 */
export function wholeBuffer(a: ArrayBufferView): ArrayBuffer | SharedArrayBuffer | undefined {
  const b = a.buffer;
  return a.byteOffset === 0 && a.byteLength === b.byteLength ? b : undefined;
}

/** wholeBuffer, for a non-shared ArrayBuffer only (what postMessage can transfer). */
export function wholeArrayBuffer(a: ArrayBufferView): ArrayBuffer | undefined {
  const b = wholeBuffer(a);
  return b instanceof ArrayBuffer ? b : undefined;
}

export class BufferPool<B extends ArrayBuffer | SharedArrayBuffer = ArrayBuffer> {
  private readonly free: B[] = [];
  private bytes = 0;
  readonly stats = { hits: 0, misses: 0, given: 0, dropped: 0 };

  /**
   * Keeps at most `maxBuffers` arrays and `maxBytes` bytes (oldest dropped first). `make` creates a missing one
   * (default an ArrayBuffer; e.g. `(n) => new SharedArrayBuffer(n)` for memory several threads work on).
   */
  constructor(private readonly maxBuffers = 8, private readonly maxBytes = 1 << 30, private readonly make: (bytes: number) => B = (n) => new ArrayBuffer(n) as B) {}

  /** An array of exactly `bytes` bytes: a pooled one if there is one, else a new one. */
  take(bytes: number): B {
    for (let i = this.free.length - 1; i >= 0; i--) {
      if (this.free[i].byteLength === bytes) {
        const b = this.free.splice(i, 1)[0];
        this.bytes -= b.byteLength;
        this.stats.hits++;
        return b;
      }
    }
    this.stats.misses++;
    return this.make(bytes);
  }

  /** Gives an array back (it must not be used elsewhere any more). Detached or oversized arrays are not kept. */
  give(b: B): void {
    this.stats.given++;
    if (b.byteLength === 0 || b.byteLength > this.maxBytes) { this.stats.dropped++; return; }
    this.free.push(b);
    this.bytes += b.byteLength;
    while (this.free.length > this.maxBuffers || this.bytes > this.maxBytes) {
      this.bytes -= this.free.shift()!.byteLength;
      this.stats.dropped++;
    }
  }

  get size(): number { return this.free.length; }
}
