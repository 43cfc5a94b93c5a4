// The ZIP container of a PyTorch checkpoint (torch >= 1.6 "zipfile" serialization, written by miniz inside
// torch): one member per storage plus the pickle, usually STORED (torch aligns each member's data to 64 bytes
// so it can be memory-mapped), sometimes DEFLATEd by other zip tools, ZIP64 when a shard passes 4 GiB.
//
// Members are located through the central directory only: torch sets the "data descriptor" flag, so the
// local headers carry zero sizes; they are read just to find where each member's data begins. Nothing
// in the file is trusted: record counts, sizes and offsets are checked against the file size before they
// are used, and the member that holds a byte range is never asked to read outside its own extent.

import fs from 'node:fs';
import zlib from 'node:zlib';
import { FormatError, UnsupportedError } from '../errors.ts';

/** One member of the archive. */
export interface ZipMember {
  name: string;
  /** 0 = STORED, 8 = DEFLATE. */
  method: number;
  /** Absolute offset of the member's (possibly compressed) data in the file. */
  dataOffset: number;
  compressedSize: number;
  size: number;
}

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_EOCD64 = 0x06064b50;
const SIG_EOCD64_LOCATOR = 0x07064b50;
const EOCD_MIN = 22;
/** The EOCD may be followed by a comment of at most 65535 bytes. */
const EOCD_SEARCH = EOCD_MIN + 0xffff;
/** Bound on the central directory we read into memory (a checkpoint has one member per storage + 3). */
const MAX_CENTRAL_BYTES = 64 << 20;
const MAX_MEMBERS = 1_000_000;
/** fs.readSync takes at most 2 GiB - 1 per call. */
const READ_CHUNK = 1 << 30;
const U32_MAX = 0xffffffff;

/** Positioned read of exactly dst.length bytes (FormatError if the file ends first). */
export function readAt(fd: number, dst: Uint8Array, pos: number, file: string): void {
  let done = 0;
  while (done < dst.length) {
    const n = fs.readSync(fd, dst, done, Math.min(dst.length - done, READ_CHUNK), pos + done);
    if (n === 0) throw new FormatError(`${file}: unexpected end of file at byte ${pos + done}`, { hint: 'the file was truncated or replaced after it was opened' });
    done += n;
  }
}

function u64(dv: DataView, at: number, file: string, what: string): number {
  const v = dv.getBigUint64(at, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`${file}: zip ${what} ${v} is too large`, { hint: 'the archive is corrupt' });
  return Number(v);
}

/** The members of a zip file (central directory), validated against the file size. */
export class ZipArchive {
  readonly file: string;
  readonly fd: number;
  readonly size: number;
  readonly members: Map<string, ZipMember>;

  private constructor(file: string, fd: number, size: number, members: Map<string, ZipMember>) {
    this.file = file;
    this.fd = fd;
    this.size = size;
    this.members = members;
  }

  /** Reads the central directory of the open file `fd`. Throws FormatError for anything malformed. */
  static read(fd: number, file: string): ZipArchive {
    const size = fs.fstatSync(fd).size;
    if (size < EOCD_MIN) throw new FormatError(`${file}: ${size} bytes is too short for a zip archive`, { hint: 'the file is truncated' });
    const tailLen = Math.min(size, EOCD_SEARCH);
    const tail = new Uint8Array(tailLen);
    readAt(fd, tail, size - tailLen, file);
    const tv = new DataView(tail.buffer);
    // The EOCD is the last record whose comment length reaches exactly to the end of the file.
    let eocd = -1;
    for (let i = tailLen - EOCD_MIN; i >= 0; i--) {
      if (tv.getUint32(i, true) === SIG_EOCD && i + EOCD_MIN + tv.getUint16(i + 20, true) === tailLen) { eocd = i; break; }
    }
    if (eocd < 0) throw new FormatError(`${file}: no zip end-of-central-directory record`, { hint: 'the file is truncated or is not a zip archive' });
    const eocdAbs = size - tailLen + eocd;
    if (tv.getUint16(eocd + 4, true) !== 0 || tv.getUint16(eocd + 6, true) !== 0) {
      throw new UnsupportedError(`${file}: multi-disk (split) zip archives are not supported`);
    }
    let count = tv.getUint16(eocd + 10, true);
    let cdSize = tv.getUint32(eocd + 12, true);
    let cdOffset = tv.getUint32(eocd + 16, true);
    if (count === 0xffff || cdSize === U32_MAX || cdOffset === U32_MAX) {
      // ZIP64: a 20-byte locator sits right before the EOCD and points at the 56-byte EOCD64 record.
      if (eocdAbs < 20) throw new FormatError(`${file}: ZIP64 archive without a ZIP64 end-of-central-directory locator`);
      const loc = new Uint8Array(20);
      readAt(fd, loc, eocdAbs - 20, file);
      const lv = new DataView(loc.buffer);
      if (lv.getUint32(0, true) !== SIG_EOCD64_LOCATOR) throw new FormatError(`${file}: ZIP64 archive without a ZIP64 end-of-central-directory locator`);
      const e64 = u64(lv, 8, file, 'ZIP64 EOCD offset');
      if (e64 + 56 > eocdAbs - 20) throw new FormatError(`${file}: ZIP64 end-of-central-directory offset ${e64} is out of range`);
      const rec = new Uint8Array(56);
      readAt(fd, rec, e64, file);
      const rv = new DataView(rec.buffer);
      if (rv.getUint32(0, true) !== SIG_EOCD64) throw new FormatError(`${file}: bad ZIP64 end-of-central-directory signature`);
      count = u64(rv, 32, file, 'member count');
      cdSize = u64(rv, 40, file, 'central directory size');
      cdOffset = u64(rv, 48, file, 'central directory offset');
    }
    if (count > MAX_MEMBERS) throw new FormatError(`${file}: zip claims ${count} members (limit ${MAX_MEMBERS})`);
    if (cdSize > MAX_CENTRAL_BYTES) throw new FormatError(`${file}: zip central directory of ${cdSize} bytes exceeds the ${MAX_CENTRAL_BYTES}-byte limit`);
    if (cdOffset + cdSize > eocdAbs) throw new FormatError(`${file}: zip central directory [${cdOffset}, ${cdOffset + cdSize}) runs past its end record at ${eocdAbs}`, { hint: 'the file is truncated or corrupt' });
    const cd = new Uint8Array(cdSize);
    readAt(fd, cd, cdOffset, file);
    const cv = new DataView(cd.buffer);
    const members = new Map<string, ZipMember>();
    const utf8 = new TextDecoder('utf-8', { fatal: true });
    let p = 0;
    for (let k = 0; k < count; k++) {
      if (p + 46 > cdSize || cv.getUint32(p, true) !== SIG_CENTRAL) throw new FormatError(`${file}: zip central directory entry ${k} is malformed (at +${p})`);
      const flags = cv.getUint16(p + 8, true);
      const method = cv.getUint16(p + 10, true);
      let csize = cv.getUint32(p + 20, true);
      let usize = cv.getUint32(p + 24, true);
      const nameLen = cv.getUint16(p + 28, true);
      const extraLen = cv.getUint16(p + 30, true);
      const commentLen = cv.getUint16(p + 32, true);
      let localOff = cv.getUint32(p + 42, true);
      const end = p + 46 + nameLen + extraLen + commentLen;
      if (end > cdSize) throw new FormatError(`${file}: zip central directory entry ${k} runs past the directory`);
      let name: string;
      try {
        name = utf8.decode(cd.subarray(p + 46, p + 46 + nameLen));
      } catch {
        throw new FormatError(`${file}: zip member ${k} has a name that is not UTF-8`);
      }
      // ZIP64 extra field (id 1): the 64-bit values of exactly those fields that read 0xFFFFFFFF, in order.
      let x = p + 46 + nameLen;
      const xEnd = x + extraLen;
      while (x + 4 <= xEnd) {
        const id = cv.getUint16(x, true);
        const len = cv.getUint16(x + 2, true);
        if (x + 4 + len > xEnd) throw new FormatError(`${file}: zip member '${name}' has a malformed extra field`);
        if (id === 1) {
          let q = x + 4;
          const take = (what: string): number => {
            if (q + 8 > x + 4 + len) throw new FormatError(`${file}: zip member '${name}' ZIP64 extra field lacks the ${what}`);
            const v = u64(cv, q, file, what);
            q += 8;
            return v;
          };
          if (usize === U32_MAX) usize = take('uncompressed size');
          if (csize === U32_MAX) csize = take('compressed size');
          if (localOff === U32_MAX) localOff = take('local header offset');
        }
        x += 4 + len;
      }
      p = end;
      if (flags & 1) throw new UnsupportedError(`${file}: zip member '${name}' is encrypted`);
      if (method !== 0 && method !== 8) {
        throw new UnsupportedError(`${file}: zip member '${name}' uses compression method ${method}`, { hint: 'only STORED and DEFLATE members are read; re-save the checkpoint with torch.save' });
      }
      if (method === 0 && csize !== usize) throw new FormatError(`${file}: zip member '${name}' is STORED but its sizes differ (${csize} vs ${usize})`);
      if (members.has(name)) throw new FormatError(`${file}: zip member '${name}' appears twice`, { hint: 'the archive is corrupt or hostile' });
      if (localOff + 30 > cdOffset) throw new FormatError(`${file}: zip member '${name}' local header at ${localOff} is out of range`);
      members.set(name, { name, method, dataOffset: localOff, compressedSize: csize, size: usize });
    }
    // Where each member's data starts is only known from its local header (its name and extra lengths may
    // differ from the central ones: torch pads the local extra field to align the data).
    const lh = new Uint8Array(30);
    const lv = new DataView(lh.buffer);
    const spans: [number, number, string][] = [];
    for (const m of members.values()) {
      readAt(fd, lh, m.dataOffset, file);
      if (lv.getUint32(0, true) !== SIG_LOCAL) throw new FormatError(`${file}: zip member '${m.name}' has no local header at ${m.dataOffset}`, { hint: 'the archive is corrupt' });
      const start = m.dataOffset + 30 + lv.getUint16(26, true) + lv.getUint16(28, true);
      if (start + m.compressedSize > cdOffset) {
        throw new FormatError(`${file}: zip member '${m.name}' data [${start}, ${start + m.compressedSize}) runs past the central directory at ${cdOffset}`, { hint: 'the file is truncated or corrupt' });
      }
      spans.push([m.dataOffset, start + m.compressedSize, m.name]);
      m.dataOffset = start;
    }
    // Members must not overlap: otherwise one storage's bytes could be read as another's (a "zip bomb" trick).
    spans.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < spans.length; i++) {
      if (spans[i][0] < spans[i - 1][1]) throw new FormatError(`${file}: zip members '${spans[i - 1][2]}' and '${spans[i][2]}' overlap`, { hint: 'the archive is corrupt or hostile' });
    }
    return new ZipArchive(file, fd, size, members);
  }

  /**
   * Bytes [begin, end) of a member's uncompressed content. STORED members are read in place; DEFLATE
   * members are inflated whole (bounded by their declared size) and sliced.
   */
  read(m: ZipMember, begin: number, end: number, dst?: Uint8Array): Uint8Array {
    if (begin < 0 || end < begin || end > m.size) throw new FormatError(`${this.file}: read [${begin}, ${end}) outside zip member '${m.name}' (${m.size} bytes)`);
    const out = dst ?? new Uint8Array(end - begin);
    if (out.length !== end - begin) throw new FormatError(`${this.file}: destination of ${out.length} bytes for a ${end - begin}-byte read`);
    if (m.method === 0) {
      readAt(this.fd, out, m.dataOffset + begin, this.file);
      return out;
    }
    const comp = new Uint8Array(m.compressedSize);
    readAt(this.fd, comp, m.dataOffset, this.file);
    let full: Buffer;
    try {
      // maxOutputLength turns a member that inflates past its declared size into an error, not an OOM.
      full = zlib.inflateRawSync(comp, { maxOutputLength: Math.max(1, m.size) });
    } catch (e) {
      throw new FormatError(`${this.file}: zip member '${m.name}' does not inflate to its declared ${m.size} bytes: ${(e as Error).message}`, { cause: e });
    }
    if (full.length !== m.size) throw new FormatError(`${this.file}: zip member '${m.name}' inflates to ${full.length} bytes, its header says ${m.size}`);
    out.set(full.subarray(begin, end));
    return out;
  }
}
