// A restricted pickle machine: enough of Python's pickle (protocols 2–5) to rebuild a PyTorch state dict,
// and nothing that can run code. Python's unpickler calls whatever `module.name` a GLOBAL names; this one
// knows a fixed allow-list (OrderedDict, torch's tensor/parameter rebuild functions, torch.*Storage classes,
// torch dtypes) and refuses every other global at the GLOBAL opcode itself, before anything could call it.
// The allow-listed "calls" are JS functions that only build plain values (see `reduce` below).
//
// The machine is iterative (no recursion over the input), every length is checked against the bytes left,
// ints are bounded, and the MARK stack is bounded, so a hostile stream can only end in a FormatError.
// Opcodes are those CPython's pickler emits for dicts/lists/tuples/str/int/float/bool/None; anything else
// (instances via NEWOBJ/INST/OBJ, extension registry, bytes, out-of-band buffers) is a FormatError.

import { FormatError } from '../errors.ts';

/** A global the allow-list admits, as a value (callable via REDUCE, or a storage class / dtype marker). */
export class PGlobal {
  constructor(readonly module: string, readonly name: string) {}
  get qualified(): string { return `${this.module}.${this.name}`; }
}

/** A Python tuple (immutable; kept apart from lists so argument shapes can be checked). */
export class PTuple {
  constructor(readonly items: readonly PValue[]) {}
}

/** A dict or OrderedDict (insertion order kept, as both are in Python ≥ 3.7). */
export class PDict {
  readonly map = new Map<PKey, PValue>();
  constructor(readonly ordered: boolean) {}
}

/** What persistent_load returns (torch: a storage) — opaque to the machine. */
export interface PExternal { readonly external: true }

/** A tensor rebuilt by torch._utils._rebuild_tensor_v2: a strided view of a storage (sizes in elements). */
export class PTensor {
  constructor(readonly storage: PExternal, readonly offset: number, readonly shape: readonly number[], readonly stride: readonly number[]) {}
}

export type PKey = string | number | bigint | boolean | null;
export type PValue = PKey | PValue[] | PTuple | PDict | PGlobal | PTensor | PExternal;

/** Globals a state dict may reference. Storage classes are data (resolved by persistent_load), not callables. */
const CALLABLES = new Set([
  'collections.OrderedDict',
  'torch._utils._rebuild_tensor_v2',
  'torch._utils._rebuild_parameter',
  'torch._utils._rebuild_parameter_with_state',
]);
export const STORAGE_CLASSES = new Set([
  'HalfStorage', 'FloatStorage', 'DoubleStorage', 'BFloat16Storage', 'LongStorage', 'IntStorage', 'ShortStorage',
  'CharStorage', 'ByteStorage', 'BoolStorage',
]);
const DTYPES = new Set(['float16', 'half', 'bfloat16', 'float32', 'float', 'float64', 'double', 'int64', 'long', 'int32', 'int', 'int16', 'short', 'int8', 'uint8', 'bool']);

function allowed(module: string, name: string): boolean {
  if (CALLABLES.has(`${module}.${name}`)) return true;
  return module === 'torch' && (STORAGE_CLASSES.has(name) || DTYPES.has(name));
}

export interface PickleLimits {
  /** Most nested MARKs open at once. */
  maxMarks: number;
  /** Most memo entries. */
  maxMemo: number;
}
const DEFAULT_LIMITS: PickleLimits = { maxMarks: 10_000, maxMemo: 10_000_000 };
/** LONG1/LONG4 longer than this are refused (a state dict's ints are sizes and offsets). */
const MAX_LONG_BYTES = 16;

const utf8 = new TextDecoder('utf-8', { fatal: true });
const latin1 = new TextDecoder('latin1');

/** Short description of a value for error messages (never recurses). */
export function kindOf(v: PValue): string {
  if (v === null) return 'None';
  if (Array.isArray(v)) return 'a list';
  if (v instanceof PTuple) return `a ${v.items.length}-tuple`;
  if (v instanceof PDict) return v.ordered ? 'an OrderedDict' : 'a dict';
  if (v instanceof PGlobal) return v.qualified;
  if (v instanceof PTensor) return 'a tensor';
  if (typeof v === 'object') return 'a storage';
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? v.slice(0, 37) + '...' : v)}`;
  return `the ${typeof v} ${String(v)}`;
}

/**
 * Runs `data` (a pickle stream) and returns the value STOP leaves. `persistentLoad` resolves BINPERSID ids;
 * `source` names the stream in errors. Throws FormatError for any stream this machine does not accept.
 */
export function unpickle(data: Uint8Array, source: string, persistentLoad: (pid: PValue) => PValue, limits: PickleLimits = DEFAULT_LIMITS): PValue {
  const n = data.length;
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let pos = 0;
  let op = 0;
  let opAt = 0;
  let stack: PValue[] = [];
  const marks: PValue[][] = [];
  const memo = new Map<number, PValue>();

  const fail = (what: string, hint?: string): never => {
    throw new FormatError(`${source}: ${what} (pickle opcode 0x${op.toString(16).padStart(2, '0')} at byte ${opAt})`, { hint: hint ?? 'the checkpoint is corrupt, or not a plain PyTorch state dict' });
  };
  const need = (k: number): number => {
    if (k > n - pos) fail(`truncated pickle: ${k} more bytes needed, ${n - pos} left`);
    const at = pos;
    pos += k;
    return at;
  };
  const pop = (): PValue => {
    if (stack.length === 0) fail('pickle stack underflow');
    return stack.pop() as PValue;
  };
  const top = (): PValue => {
    if (stack.length === 0) fail('pickle stack underflow');
    return stack[stack.length - 1];
  };
  const popMark = (): PValue[] => {
    const items = stack;
    const prev = marks.pop();
    if (prev === undefined) fail('pickle MARK stack underflow');
    stack = prev as PValue[];
    return items;
  };
  const line = (): string => {
    const end = data.indexOf(0x0a, pos);
    if (end < 0 || end - pos > 1024) fail('GLOBAL without a newline-terminated name');
    const s = latin1.decode(data.subarray(pos, end));
    pos = end + 1;
    return s;
  };
  const text = (len: number): string => {
    const at = need(len);
    try {
      return utf8.decode(data.subarray(at, at + len));
    } catch {
      return fail('string is not valid UTF-8');
    }
  };
  const long = (len: number): number | bigint => {
    if (len > MAX_LONG_BYTES) fail(`integer of ${len} bytes is too large for a state dict`);
    const at = need(len);
    let v = 0n;
    for (let i = len - 1; i >= 0; i--) v = (v << 8n) | BigInt(data[at + i]);
    if (len > 0 && data[at + len - 1] & 0x80) v -= 1n << BigInt(8 * len);
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  };
  const put = (idx: number): void => {
    if (memo.size >= limits.maxMemo && !memo.has(idx)) fail(`more than ${limits.maxMemo} memo entries`);
    memo.set(idx, top());
  };
  const get = (idx: number): void => {
    const v = memo.get(idx);
    if (v === undefined) fail(`memo entry ${idx} was never stored`);
    stack.push(v as PValue);
  };
  const global = (module: string, name: string): void => {
    if (!allowed(module, name)) {
      throw new FormatError(`refusing to load ${source}: the pickle references ${module}.${name}, which is not a tensor; only plain state dicts are read (convert it to safetensors)`, {
        hint: 'nothing from the file was executed; if you trust it, convert it in Python: safetensors.torch.save_file(torch.load(f), out)',
      });
    }
    stack.push(new PGlobal(module, name));
  };
  const setItems = (d: PValue, items: PValue[]): void => {
    if (!(d instanceof PDict)) fail(`SETITEM(S) on ${kindOf(d)}, not a dict`);
    if (items.length % 2 !== 0) fail('SETITEMS with an odd number of items');
    for (let i = 0; i < items.length; i += 2) {
      const k = items[i];
      if (k !== null && typeof k === 'object') fail(`dict key is ${kindOf(k)}; state dict keys are strings`);
      (d as PDict).map.set(k as PKey, items[i + 1]);
    }
  };
  const appendItems = (l: PValue, items: PValue[]): void => {
    if (!Array.isArray(l)) fail(`APPEND(S) on ${kindOf(l)}, not a list`);
    for (const x of items) (l as PValue[]).push(x);
  };

  while (pos < n) {
    opAt = pos;
    op = data[pos++];
    switch (op) {
      case 0x80: { // PROTO
        const v = data[need(1)];
        if (v < 2 || v > 5) fail(`pickle protocol ${v} is not supported (2 to 5 are)`);
        break;
      }
      case 0x95: { // FRAME: a length prefix for buffering; the content follows inline
        const len = dv.getBigUint64(need(8), true);
        if (len > BigInt(n - pos)) fail(`frame of ${len} bytes runs past the end of the pickle`);
        break;
      }
      case 0x2e: { // STOP
        const v = pop();
        if (stack.length !== 0 || marks.length !== 0) fail('values left on the pickle stack at STOP');
        if (pos !== n) fail(`${n - pos} bytes after the pickle's STOP`);
        return v;
      }
      case 0x7d: stack.push(new PDict(false)); break; // EMPTY_DICT
      case 0x5d: stack.push([]); break; // EMPTY_LIST
      case 0x29: stack.push(new PTuple([])); break; // EMPTY_TUPLE
      case 0x28: // MARK
        if (marks.length >= limits.maxMarks) fail(`more than ${limits.maxMarks} nested MARKs`);
        marks.push(stack);
        stack = [];
        break;
      case 0x30: pop(); break; // POP
      case 0x31: popMark(); break; // POP_MARK
      case 0x32: stack.push(top()); break; // DUP
      case 0x58: stack.push(text(dv.getUint32(need(4), true))); break; // BINUNICODE
      case 0x8c: stack.push(text(data[need(1)])); break; // SHORT_BINUNICODE
      case 0x8d: { // BINUNICODE8
        const len = dv.getBigUint64(need(8), true);
        if (len > BigInt(n - pos)) fail(`string of ${len} bytes runs past the end of the pickle`);
        stack.push(text(Number(len)));
        break;
      }
      case 0x54: { // BINSTRING (a Python 2 str; read as latin-1 like Python 3's encoding='latin1')
        const len = dv.getInt32(need(4), true);
        if (len < 0) fail('negative string length');
        const at = need(len);
        stack.push(latin1.decode(data.subarray(at, at + len)));
        break;
      }
      case 0x55: { // SHORT_BINSTRING
        const len = data[need(1)];
        const at = need(len);
        stack.push(latin1.decode(data.subarray(at, at + len)));
        break;
      }
      case 0x4a: stack.push(dv.getInt32(need(4), true)); break; // BININT
      case 0x4b: stack.push(data[need(1)]); break; // BININT1
      case 0x4d: stack.push(dv.getUint16(need(2), true)); break; // BININT2
      case 0x8a: stack.push(long(data[need(1)])); break; // LONG1
      case 0x8b: { // LONG4
        const len = dv.getInt32(need(4), true);
        if (len < 0) fail('negative LONG4 length');
        stack.push(long(len));
        break;
      }
      case 0x47: stack.push(dv.getFloat64(need(8), false)); break; // BINFLOAT (big-endian)
      case 0x4e: stack.push(null); break; // NONE
      case 0x88: stack.push(true); break; // NEWTRUE
      case 0x89: stack.push(false); break; // NEWFALSE
      case 0x74: { const items = popMark(); stack.push(new PTuple(items)); break; } // TUPLE (pop first: popMark swaps `stack`)
      case 0x85: stack.push(new PTuple([pop()])); break; // TUPLE1
      case 0x86: { const b = pop(); const a = pop(); stack.push(new PTuple([a, b])); break; } // TUPLE2
      case 0x87: { const c = pop(); const b = pop(); const a = pop(); stack.push(new PTuple([a, b, c])); break; } // TUPLE3
      case 0x6c: { const items = popMark(); stack.push(items); break; } // LIST
      case 0x64: { const d = new PDict(false); setItems(d, popMark()); stack.push(d); break; } // DICT
      case 0x71: put(data[need(1)]); break; // BINPUT
      case 0x72: put(dv.getUint32(need(4), true)); break; // LONG_BINPUT
      case 0x94: put(memo.size); break; // MEMOIZE
      case 0x68: get(data[need(1)]); break; // BINGET
      case 0x6a: get(dv.getUint32(need(4), true)); break; // LONG_BINGET
      case 0x63: { // GLOBAL "module\nname\n"
        const module = line();
        const name = line();
        global(module, name);
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = pop();
        const module = pop();
        if (typeof module !== 'string' || typeof name !== 'string') fail('STACK_GLOBAL needs two strings');
        global(module as string, name as string);
        break;
      }
      case 0x52: { // REDUCE: callable(*args) — only allow-listed callables, implemented here without Python
        const args = pop();
        const fn = pop();
        if (!(args instanceof PTuple)) fail(`REDUCE arguments are ${kindOf(args)}, not a tuple`);
        stack.push(reduce(fn, (args as PTuple).items, fail));
        break;
      }
      case 0x62: { // BUILD: obj.__setstate__(state). OrderedDict state dicts carry `_metadata` (module versions)
        // this way; it is not needed to read tensors, so the state is dropped.
        pop();
        const obj = top();
        if (!(obj instanceof PDict) && !(obj instanceof PTensor)) fail(`BUILD on ${kindOf(obj)}`);
        break;
      }
      case 0x73: { const v = pop(); const k = pop(); setItems(top(), [k, v]); break; } // SETITEM
      case 0x75: { const items = popMark(); setItems(top(), items); break; } // SETITEMS
      case 0x61: { const v = pop(); appendItems(top(), [v]); break; } // APPEND
      case 0x65: { const items = popMark(); appendItems(top(), items); break; } // APPENDS
      case 0x51: stack.push(persistentLoad(pop())); break; // BINPERSID
      default:
        fail(`unsupported pickle opcode 0x${op.toString(16).padStart(2, '0')}`, 'only plain state dicts (dicts of tensors) are read; convert the checkpoint to safetensors');
    }
  }
  return fail('pickle ends without STOP', 'the file is truncated');
}

/** The allow-listed callables, as pure functions of their (already built) arguments. */
function reduce(fn: PValue, args: readonly PValue[], fail: (what: string) => never): PValue {
  if (!(fn instanceof PGlobal) || !CALLABLES.has(fn.qualified)) return fail(`REDUCE calls ${kindOf(fn)}, which is not callable here`);
  switch (fn.qualified) {
    case 'collections.OrderedDict': {
      const d = new PDict(true);
      if (args.length === 0) return d;
      const pairs = args[0];
      if (args.length !== 1 || !Array.isArray(pairs)) return fail('OrderedDict() takes no argument or a list of pairs here');
      for (const p of pairs) {
        if (!(p instanceof PTuple) || p.items.length !== 2) return fail('OrderedDict() pair is not a 2-tuple');
        const k = p.items[0];
        if (k !== null && typeof k === 'object') return fail(`dict key is ${kindOf(k)}; state dict keys are strings`);
        d.map.set(k as PKey, p.items[1]);
      }
      return d;
    }
    case 'torch._utils._rebuild_tensor_v2': {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (args.length !== 6 && args.length !== 7) return fail(`_rebuild_tensor_v2 takes 6 or 7 arguments, got ${args.length}`);
      const [storage, offset, size, stride] = args;
      if (storage === null || typeof storage !== 'object' || !('external' in storage)) return fail(`_rebuild_tensor_v2: storage is ${kindOf(storage)}`);
      const off = index(offset, 'storage_offset', fail);
      const shape = ints(size, 'size', fail);
      const strides = ints(stride, 'stride', fail);
      if (shape.length !== strides.length) return fail(`_rebuild_tensor_v2: size has ${shape.length} dims, stride ${strides.length}`);
      if (typeof args[4] !== 'boolean') return fail('_rebuild_tensor_v2: requires_grad is not a bool');
      return new PTensor(storage as PExternal, off, shape, strides);
    }
    case 'torch._utils._rebuild_parameter':
    case 'torch._utils._rebuild_parameter_with_state': {
      // (data, requires_grad, backward_hooks[, state]): a Parameter is its tensor for reading purposes.
      if (args.length < 3 || !(args[0] instanceof PTensor)) return fail(`${fn.name} needs a tensor as first of 3-4 arguments`);
      return args[0];
    }
  }
  return fail(`REDUCE calls ${fn.qualified}`);
}

function index(v: PValue, what: string, fail: (what: string) => never): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) return fail(`${what} is ${kindOf(v)}, not a non-negative integer`);
  return v;
}

function ints(v: PValue, what: string, fail: (what: string) => never): number[] {
  if (!(v instanceof PTuple)) return fail(`${what} is ${kindOf(v)}, not a tuple`);
  if (v.items.length > 64) return fail(`${what} has ${v.items.length} dims`);
  return v.items.map((x) => index(x, what, fail));
}
