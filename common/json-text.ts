// JSON that keeps its numbers as written. Python's json writes 1000000.0 for a float and 1000000 for an int, and
// transformers' config classes read the two differently (rope_theta, rope_scaling.factor are floats; a config
// rewritten by JSON.parse + JSON.stringify turns them into ints). Editing a config.json through this module keeps
// every number's text: parseJsonText gives plain objects and arrays whose numbers are JsonNumber (the source
// text), stringifyJsonText writes them back verbatim, and toJsonNumber makes new ones.

/** A JSON number literal, kept as its source text (`1000000.0`, `1e-05`, `8`). */
export class JsonNumber {
  constructor(readonly text: string) {
    if (!/^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$/.test(text)) throw new Error(`not a JSON number: ${text}`);
  }
  get value(): number { return Number(this.text); }
  toJSON(): number { return this.value; }
}

export type JsonText = null | boolean | string | JsonNumber | JsonText[] | { [key: string]: JsonText };

const NUMBER_RE = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;

/** A number as Python's json writes it: floats always with a '.' or exponent (`float` = true), ints without. */
export function toJsonNumber(n: number, float: boolean): JsonNumber {
  if (!Number.isFinite(n)) throw new Error(`JSON has no ${n}`);
  const s = String(n);
  return new JsonNumber(float && Number.isInteger(n) && !/e/.test(s) ? `${s}.0` : s);
}

/** Parses JSON text (RFC 8259); numbers become JsonNumber. Throws SyntaxError with the offset of the problem. */
export function parseJsonText(text: string): JsonText {
  let i = 0;
  const fail = (what: string): never => { throw new SyntaxError(`${what} at position ${i}`); };
  const ws = (): void => { while (i < text.length && ' \t\n\r'.includes(text[i])) i++; };
  const value = (): JsonText => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const obj: { [key: string]: JsonText } = {};
      ws();
      if (text[i] === '}') { i++; return obj; }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a string key');
        const k = string();
        ws();
        if (text[i++] !== ':') fail("expected ':'");
        Object.defineProperty(obj, k, { value: value(), enumerable: true, writable: true, configurable: true }); // "__proto__" too
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === '}') { i++; return obj; }
        fail("expected ',' or '}'");
      }
    }
    if (c === '[') {
      i++;
      const arr: JsonText[] = [];
      ws();
      if (text[i] === ']') { i++; return arr; }
      for (;;) {
        arr.push(value());
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === ']') { i++; return arr; }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return string();
    for (const [word, v] of [['true', true], ['false', false], ['null', null]] as const) {
      if (text.startsWith(word, i)) { i += word.length; return v; }
    }
    NUMBER_RE.lastIndex = i;
    const m = NUMBER_RE.exec(text);
    if (!m || m[0] === '' || m[0] === '-') return fail('unexpected character');
    i += m[0].length;
    return new JsonNumber(m[0]);
  };
  const string = (): string => {
    const start = i++;
    while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
    if (i >= text.length) fail('unterminated string');
    i++;
    try {
      return JSON.parse(text.slice(start, i)) as string;
    } catch {
      return fail('invalid string');
    }
  };
  const v = value();
  ws();
  if (i !== text.length) fail('unexpected text after the JSON value');
  return v;
}

/** Writes JSON like JSON.stringify(v, null, indent), numbers as their JsonNumber text. */
export function stringifyJsonText(v: JsonText, indent = 2): string {
  const pad = (d: number): string => ' '.repeat(indent * d);
  const write = (x: JsonText, d: number): string => {
    if (x === null || typeof x === 'boolean') return String(x);
    if (typeof x === 'string') return JSON.stringify(x);
    if (x instanceof JsonNumber) return x.text;
    if (Array.isArray(x)) {
      if (x.length === 0) return '[]';
      return `[\n${x.map((e) => pad(d + 1) + write(e, d + 1)).join(',\n')}\n${pad(d)}]`;
    }
    const keys = Object.keys(x);
    if (keys.length === 0) return '{}';
    return `{\n${keys.map((k) => `${pad(d + 1)}${JSON.stringify(k)}: ${write(x[k], d + 1)}`).join(',\n')}\n${pad(d)}}`;
  };
  return write(v, 0);
}
