// Atomic file writes: temp file in the same directory, fsync, rename, fsync of the directory.
import fs from 'node:fs';
import path from 'node:path';

/** fs.writeSync takes at most 2 GiB - 1 per call; write in 1 GiB pieces. */
const WRITE_CHUNK = 1 << 30;

/** Writes `chunks` to `target` atomically: temp file in the same directory, fsync, rename, fsync the directory. */
export function writeFileAtomic(target: string, chunks: readonly Uint8Array[]): void {
  const tmp = `${target}.tmp-${process.pid}`;
  let fd: number | null = null;
  try {
    fd = fs.openSync(tmp, 'w', 0o644);
    for (const c of chunks) {
      let done = 0;
      while (done < c.byteLength) done += fs.writeSync(fd, c, done, Math.min(c.byteLength - done, WRITE_CHUNK));
    }
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = null;
    fs.renameSync(tmp, target);
  } catch (e) {
    if (fd !== null) { try { fs.closeSync(fd); } catch { /* already failing */ } }
    try { fs.unlinkSync(tmp); } catch { /* may not exist */ }
    throw e;
  }
  fsyncDir(path.dirname(target));
}

function fsyncDir(dir: string): void {
  // Makes the rename durable on Linux; some platforms cannot open or fsync a directory, which is harmless.
  let fd: number | null = null;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch { /* not supported here */ } finally {
    if (fd !== null) fs.closeSync(fd);
  }
}

