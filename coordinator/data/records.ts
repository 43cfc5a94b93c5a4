// Dataset records: reading JSON / JSONL files into validated, typed records.
//
// Accepted shapes (one per record, extra keys such as `id` are ignored):
//   alpaca  {instruction: string, input?: string|null, output: string (non-empty), system?: string|null}
//   chat    {messages: [{role: 'system'|'user'|'assistant', content: string}, ...]} with ≥ 1 non-empty assistant turn
//   text    {text: string (non-empty)}
//   tokens  {input_ids: int[] (non-empty), labels?: int[] (same length; −100 = not trained)} — pre-tokenized, used as
//           they are (no template, no BOS/EOS added); without labels every token is trained
// Files: `.jsonl` (one object per line, blank lines allowed) is read line by line in fixed-size chunks so a
// multi-gigabyte file never sits in memory as one string. `.json` is either a top-level array of records or,
// when its first non-blank character is `{`, JSONL in disguise (common in the wild). A UTF-8 BOM is skipped.
// Errors name `file:line` (JSONL) or `file[index]` (JSON array) and say what to do.
import fs from 'node:fs';
import { DataError } from '../../common/errors.ts';

export type ChatRole = 'system' | 'user' | 'assistant';
export interface ChatMessage { role: ChatRole; content: string }

export type Record =
  | { kind: 'alpaca'; instruction: string; input?: string; output: string; system?: string }
  | { kind: 'chat'; messages: ChatMessage[] }
  | { kind: 'text'; text: string }
  | { kind: 'tokens'; inputIds: number[]; labels?: number[] };
/** Alias of `Record` for modules where the name would shadow TypeScript's `Record<K, V>`. */
export type DataRecord = Record;

export interface ReadResult {
  records: Record[];
  /** Lines (JSONL, 1-based) or array indices (JSON) left out in 'skip' mode, with the reason. */
  skipped: { line: number; reason: string }[];
  /** The path as given; prefix of every message about this file. */
  source: string;
  /** How the file was read. */
  format: 'json' | 'jsonl';
}

/** The identity of a record's content: used for dedup, the split, and memoising tokenization. */
export function recordKey(r: Record): string {
  switch (r.kind) {
    case 'alpaca': return JSON.stringify(['a', r.instruction, r.input ?? '', r.output, r.system ?? '']);
    case 'chat': return JSON.stringify(['c', ...r.messages.map((m) => [m.role, m.content])]);
    case 'text': return JSON.stringify(['t', r.text]);
    case 'tokens': return JSON.stringify(['k', r.inputIds, r.labels ?? null]);
  }
}

const ROLES: ReadonlySet<string> = new Set(['system', 'user', 'assistant']);
/** A longer line is almost surely not a dataset record (a binary file, a missing newline in a dump). */
const MAX_LINE_BYTES = 64 * 1024 * 1024;
const CHUNK_BYTES = 1 << 20;

/** Thrown internally by `validateRecord`; turned into a DataError with the location prefix. */
class RecordProblem extends Error {
  constructor(message: string, readonly hint: string) { super(message); }
}

/**
 * `skipHint`: how the user turns skipping on where they came from, quoted in the error of a malformed line
 * (default: the job file's key; `coordinator eval` passes its flag).
 */
export function readRecords(path: string, opts: { onError?: 'throw' | 'skip'; skipHint?: string } = {}): ReadResult {
  const onError = opts.onError ?? 'throw';
  const skipHint = opts.skipHint ?? 'data.on_error: skip in the job file';
  let fd: number;
  try {
    fd = fs.openSync(path, 'r');
  } catch (e) {
    throw new DataError(`${path}: cannot open dataset file (${(e as NodeJS.ErrnoException).code ?? String(e)})`,
      { hint: 'check the dataset path in the job config', cause: e });
  }
  try {
    const format = detectFormat(fd, path);
    return format === 'json' ? readJsonArray(fd, path, onError, skipHint) : readJsonl(fd, path, onError, skipHint);
  } finally {
    fs.closeSync(fd);
  }
}

/** `.jsonl` → jsonl; anything else: first non-blank character `[` → json array, `{` → jsonl. */
function detectFormat(fd: number, path: string): 'json' | 'jsonl' {
  if (/\.jsonl$/i.test(path)) return 'jsonl';
  const buf = new Uint8Array(4096);
  let pos = 0;
  for (;;) {
    const n = fs.readSync(fd, buf, 0, buf.length, pos);
    if (n === 0) return 'jsonl'; // empty or all blank: zero records either way
    for (let i = 0; i < n; i++) {
      const b = buf[i];
      if (pos === 0 && i === 0 && n >= 3 && b === 0xef && buf[1] === 0xbb && buf[2] === 0xbf) { i += 2; continue; }
      if (b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09) continue;
      if (b === 0x5b) return 'json';
      if (b === 0x7b) return 'jsonl';
      throw new DataError(`${path}: not a JSON/JSONL dataset (first character is ${JSON.stringify(String.fromCharCode(b))})`,
        { hint: 'a dataset is a JSON array of records or one JSON object per line (.jsonl)' });
    }
    pos += n;
  }
}

function readJsonl(fd: number, path: string, onError: 'throw' | 'skip', skipHint: string): ReadResult {
  const records: Record[] = [];
  const skipped: { line: number; reason: string }[] = [];
  // Line 1 may start with a BOM (the decoder drops it); elsewhere a BOM is an error like any stray character.
  const firstLineDecoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: false });
  const decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
  const chunk = new Uint8Array(CHUNK_BYTES);
  let carry: Uint8Array = new Uint8Array(0); // bytes of the current unfinished line
  let lineNo = 0;
  let filePos = 0;

  const handleLine = (bytes: Uint8Array): void => {
    lineNo++;
    let text: string;
    try {
      text = (lineNo === 1 ? firstLineDecoder : decoder).decode(bytes);
    } catch {
      return fail(lineNo, new RecordProblem('not valid UTF-8', 're-save the file as UTF-8 (without a legacy encoding such as GBK)'));
    }
    if (text.endsWith('\r')) text = text.slice(0, -1);
    if (text.trim() === '') return;
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (e) {
      return fail(lineNo, new RecordProblem(`invalid JSON (${(e as Error).message})`,
        'each line of a .jsonl file must be one complete JSON object; pretty-printed JSON belongs in a .json array'));
    }
    try {
      records.push(validateRecord(value));
    } catch (e) {
      if (e instanceof RecordProblem) return fail(lineNo, e);
      throw e;
    }
  };
  const fail = (line: number, p: RecordProblem): void => {
    if (onError === 'skip') { skipped.push({ line, reason: p.message }); return; }
    throw new DataError(`${path}:${line}: ${p.message}`, { hint: `${p.hint}; or set ${skipHint} to leave bad lines out` });
  };

  for (;;) {
    const n = fs.readSync(fd, chunk, 0, chunk.length, filePos);
    if (n === 0) break;
    filePos += n;
    let start = 0;
    for (let i = 0; i < n; i++) {
      if (chunk[i] !== 0x0a) continue;
      const piece = chunk.subarray(start, i);
      handleLine(carry.length ? concat(carry, piece) : piece);
      carry = new Uint8Array(0);
      start = i + 1;
    }
    if (start < n) {
      carry = concat(carry, chunk.subarray(start, n));
      if (carry.length > MAX_LINE_BYTES) {
        throw new DataError(`${path}:${lineNo + 1}: line longer than ${MAX_LINE_BYTES} bytes`,
          { hint: 'is this a binary file, or a JSON file with the wrong extension?' });
      }
    }
  }
  if (carry.length) handleLine(carry);
  return { records, skipped, source: path, format: 'jsonl' };
}

function readJsonArray(fd: number, path: string, onError: 'throw' | 'skip', skipHint: string): ReadResult {
  const size = fs.fstatSync(fd).size;
  const buf = new Uint8Array(size);
  let off = 0;
  while (off < size) {
    const n = fs.readSync(fd, buf, off, size - off, off);
    if (n === 0) break;
    off += n;
  }
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(0, off)); // drops a BOM
  } catch {
    throw new DataError(`${path}: not valid UTF-8`, { hint: 're-save the file as UTF-8 (without a legacy encoding such as GBK)' });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    // A broken array cannot be skipped element by element: name the line so the user can fix it.
    const msg = (e as Error).message;
    const m = /position (\d+)/.exec(msg);
    const where = m ? `:${lineOf(text, Number(m[1]))}` : '';
    throw new DataError(`${path}${where}: invalid JSON (${msg})`,
      { hint: 'fix the JSON syntax, or convert the file to JSONL (one object per line) so bad lines can be skipped' });
  }
  if (!Array.isArray(value)) {
    throw new DataError(`${path}: top-level JSON value is not an array`, { hint: 'a .json dataset must be an array of records: [{...}, {...}]' });
  }
  const records: Record[] = [];
  const skipped: { line: number; reason: string }[] = [];
  for (let i = 0; i < value.length; i++) {
    try {
      records.push(validateRecord(value[i]));
    } catch (e) {
      if (!(e instanceof RecordProblem)) throw e;
      if (onError === 'skip') { skipped.push({ line: i, reason: e.message }); continue; }
      throw new DataError(`${path}[${i}]: ${e.message}`, { hint: `${e.hint}; or set ${skipHint} to leave bad records out` });
    }
  }
  return { records, skipped, source: path, format: 'json' };
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a); out.set(b, a.length);
  return out;
}

function lineOf(text: string, pos: number): number {
  let line = 1;
  for (let i = 0; i < pos && i < text.length; i++) if (text.charCodeAt(i) === 10) line++;
  return line;
}

const SHAPES_HINT = 'expected {"instruction", "output"} (alpaca), {"messages": [{"role", "content"}]} (chat), {"text"} or {"input_ids", "labels"?} (pre-tokenized)';

/** Checks one parsed JSON value and returns it as a typed record; throws RecordProblem. */
function validateRecord(v: unknown): Record {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw new RecordProblem(`record is ${v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v}, not an object`, SHAPES_HINT);
  }
  const o = v as { [k: string]: unknown };
  const has = (k: string): boolean => Object.prototype.hasOwnProperty.call(o, k) && o[k] !== undefined;
  const shapes = [has('messages') && 'messages', (has('instruction') || has('output')) && 'instruction/output', has('text') && 'text', has('input_ids') && 'input_ids']
    .filter((s): s is string => typeof s === 'string');
  if (shapes.length === 0) {
    const keys = Object.keys(o).slice(0, 8).map((k) => JSON.stringify(k)).join(', ');
    throw new RecordProblem(`record has none of the known fields (found keys: ${keys || 'none'})`,
      SHAPES_HINT + '; rename the fields (e.g. prompt/response → instruction/output)');
  }
  if (shapes.length > 1) {
    throw new RecordProblem(`record mixes formats (${shapes.join(' and ')})`, SHAPES_HINT + ': use one shape per record');
  }
  if (has('messages')) return validateChat(o.messages);
  if (has('input_ids')) return validateTokens(o.input_ids, o.labels);
  if (has('text')) {
    if (typeof o.text !== 'string') throw new RecordProblem(`"text" is ${typeOf(o.text)}, not a string`, 'text must be a string');
    if (o.text.trim() === '') throw new RecordProblem('"text" is empty', 'remove the record or give it text');
    return { kind: 'text', text: o.text };
  }
  // alpaca
  if (!has('output')) throw new RecordProblem('missing "output"', 'every alpaca record needs the answer to train on in "output"');
  if (typeof o.output !== 'string') throw new RecordProblem(`"output" is ${typeOf(o.output)}, not a string`, 'output must be a string');
  if (o.output.trim() === '') throw new RecordProblem('"output" is empty', 'an empty output trains nothing: remove the record');
  if (!has('instruction')) throw new RecordProblem('missing "instruction"', 'every alpaca record needs "instruction" (the prompt)');
  if (typeof o.instruction !== 'string') throw new RecordProblem(`"instruction" is ${typeOf(o.instruction)}, not a string`, 'instruction must be a string');
  const rec: Record = { kind: 'alpaca', instruction: o.instruction, output: o.output };
  for (const k of ['input', 'system'] as const) {
    const x = o[k];
    if (x === undefined || x === null) continue; // datasets exported from tables often write null for "absent"
    if (typeof x !== 'string') throw new RecordProblem(`"${k}" is ${typeOf(x)}, not a string`, `${k} must be a string, null or absent`);
    if (x !== '') rec[k] = x;
  }
  if (rec.instruction.trim() === '' && !rec.input) {
    throw new RecordProblem('"instruction" is empty (and there is no "input")', 'give the record a prompt or remove it');
  }
  return rec;
}

function validateChat(m: unknown): Record {
  if (!Array.isArray(m)) throw new RecordProblem(`"messages" is ${typeOf(m)}, not an array`, 'messages must be an array of {role, content}');
  if (m.length === 0) throw new RecordProblem('"messages" is empty', 'a chat record needs at least a user and an assistant turn');
  const messages: ChatMessage[] = [];
  let trainable = false;
  for (let i = 0; i < m.length; i++) {
    const x = m[i] as unknown;
    if (x === null || typeof x !== 'object' || Array.isArray(x)) {
      throw new RecordProblem(`messages[${i}] is ${typeOf(x)}, not an object`, 'each message is {"role": ..., "content": ...}');
    }
    const { role, content } = x as { role?: unknown; content?: unknown };
    if (typeof role !== 'string') throw new RecordProblem(`messages[${i}].role is ${typeOf(role)}, not a string`, 'role is one of system, user, assistant');
    if (!ROLES.has(role)) {
      throw new RecordProblem(`messages[${i}].role ${JSON.stringify(role.slice(0, 40))} is not system, user or assistant`,
        'rename roles (human → user, gpt/bot → assistant); tool calls are not supported');
    }
    if (typeof content !== 'string') {
      throw new RecordProblem(`messages[${i}].content is ${typeOf(content)}, not a string`, 'content must be plain text (multimodal parts are not supported)');
    }
    if (role === 'assistant' && content.trim() !== '') trainable = true;
    messages.push({ role: role as ChatRole, content });
  }
  if (!trainable) throw new RecordProblem('chat has no non-empty assistant turn', 'only assistant turns are trained: add one or remove the record');
  return { kind: 'chat', messages };
}

function validateTokens(ids: unknown, labels: unknown): Record {
  const ints = (v: unknown, what: string, min: number): number[] => {
    if (!Array.isArray(v)) throw new RecordProblem(`"${what}" is ${typeOf(v)}, not an array`, `${what} must be an array of token ids`);
    for (let i = 0; i < v.length; i++) {
      const x = v[i] as unknown;
      if (typeof x !== 'number' || !Number.isInteger(x) || (x < min && !(what === 'labels' && x === -100))) {
        throw new RecordProblem(`${what}[${i}] is ${JSON.stringify(x)}, not a token id`, what === 'labels' ? 'labels are token ids ≥ 0 or -100 (not trained)' : 'token ids are integers ≥ 0');
      }
    }
    return v as number[];
  };
  const inputIds = ints(ids, 'input_ids', 0);
  if (inputIds.length === 0) throw new RecordProblem('"input_ids" is empty', 'remove the record or give it tokens');
  if (labels === undefined || labels === null) return { kind: 'tokens', inputIds };
  const l = ints(labels, 'labels', 0);
  if (l.length !== inputIds.length) throw new RecordProblem(`"labels" has ${l.length} entries, "input_ids" ${inputIds.length}`, 'labels align with input_ids (unshifted), one per token');
  return { kind: 'tokens', inputIds, labels: l };
}

function typeOf(x: unknown): string {
  return x === null ? 'null' : Array.isArray(x) ? 'an array' : x === undefined ? 'missing' : `a ${typeof x}`;
}
