// Recognises a device out-of-memory failure (the cuda addon's pool allocator: "cudaMalloc of N bytes failed: out of
// memory ..."; cuBLAS workspace allocation), so a trainer can split the micro-batch and retry instead of failing.
export function isOutOfMemory(e: unknown): boolean {
  const m = e instanceof Error ? e.message : String(e);
  return /cudaMalloc of \d+ bytes failed: out of memory|CUBLAS_STATUS_ALLOC_FAILED|out of memory/i.test(m);
}
