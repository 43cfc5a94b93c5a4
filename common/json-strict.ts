// Strict JSON for headers and configs from the internet (safetensors headers, config.json, tokenizer files).
import { FormatError } from './errors.ts';

export const MAX_JSON_DEPTH = 32;

// ---------------------------------------------------------------------------------------------------------
// Strict JSON: JSON.parse silently keeps the last of duplicate keys, so a hostile header could show one
// tensor to us and another to a different reader. This parser rejects duplicates, bounds nesting, and builds
// objects as Maps (no prototype tricks with "__proto__" keys).

export type Json = null | boolean | number | string | Json[] | JsonObject;
export type JsonObject = Map<string, Json>;

class JsonSyntax extends Error {}

/** Parses JSON text strictly (duplicate keys and nesting beyond `maxDepth` are errors). Throws FormatError. */
export function parseJsonStrict(text: string, source: string, maxDepth = MAX_JSON_DEPTH): Json {
  let i = 0;
  const n = text.length;
  const fail = (what: string): never => {
    throw new JsonSyntax(`${what} at character ${i}`);
  };
  const ws = (): void => {
    while (i < n) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) i++;
      else break;
    }
  };
  const numRe = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
  const str = (): string => {
    i++; // opening quote
    let out = '';
    let start = i;
    for (;;) {
      if (i >= n) fail('unterminated string');
      const c = text.charCodeAt(i);
      if (c === 0x22) { out += text.slice(start, i); i++; return out; }
      if (c < 0x20) fail('control character in string');
      if (c !== 0x5c) { i++; continue; }
      out += text.slice(start, i);
      const e = text[i + 1];
      i += 2;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          const hex = text.slice(i, i + 4);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail('bad \\u escape');
          out += String.fromCharCode(parseInt(hex, 16));
          i += 4;
          break;
        }
        default: fail('bad escape');
      }
      start = i;
    }
  };
  const value = (depth: number): Json => {
    if (depth > maxDepth) fail(`nesting deeper than ${maxDepth}`);
    ws();
    if (i >= n) fail('unexpected end');
    const c = text[i];
    if (c === '{') {
      i++;
      const obj: JsonObject = new Map();
      ws();
      if (text[i] === '}') { i++; return obj; }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a string key');
        const key = str();
        if (obj.has(key)) fail(`duplicate key ${JSON.stringify(key.slice(0, 200))}`);
        ws();
        if (text[i] !== ':') fail('expected ":"');
        i++;
        obj.set(key, value(depth + 1));
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === '}') { i++; return obj; }
        fail('expected "," or "}"');
      }
    }
    if (c === '[') {
      i++;
      const arr: Json[] = [];
      ws();
      if (text[i] === ']') { i++; return arr; }
      for (;;) {
        arr.push(value(depth + 1));
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === ']') { i++; return arr; }
        fail('expected "," or "]"');
      }
    }
    if (c === '"') return str();
    if (text.startsWith('true', i)) { i += 4; return true; }
    if (text.startsWith('false', i)) { i += 5; return false; }
    if (text.startsWith('null', i)) { i += 4; return null; }
    numRe.lastIndex = i;
    const m = numRe.exec(text);
    if (!m) fail('unexpected character');
    i += m![0].length;
    return Number(m![0]);
  };
  try {
    const v = value(0);
    ws();
    if (i !== n) fail('trailing characters');
    return v;
  } catch (e) {
    if (e instanceof JsonSyntax) throw new FormatError(`${source}: invalid JSON: ${e.message}`);
    throw e;
  }
}

/** Map-based JSON → plain objects (null-prototype, so any key is safe). */
export function jsonToPlain(v: Json): unknown {
  if (v instanceof Map) {
    const o: Record<string, unknown> = Object.create(null);
    for (const [k, x] of v) o[k] = jsonToPlain(x);
    return o;
  }
  if (Array.isArray(v)) return v.map(jsonToPlain);
  return v;
}


/** A short rendering of a JSON value for error messages. */
export function describeJson(v: unknown): string {
  const s = v instanceof Map ? 'an object' : JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 80 ? s.slice(0, 77) + '...' : s;
}
