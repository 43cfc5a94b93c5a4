// Text ↔ token ids for HF model directories, and chat templates.
//
// Tokenization is delegated to @huggingface/tokenizers (a JS port of the Rust `tokenizers` pipeline:
// normalizer → pre-tokenizer → model (BPE / WordPiece / Unigram) → post-processor, and the decoder) reading
// `tokenizer.json`; chat templates are Jinja, rendered by @huggingface/jinja with the variables transformers'
// `apply_chat_template` passes (messages, add_generation_prompt, the special-token strings).
//
// tokenizer.json files come from the internet: the structure the library relies on is checked first, and
// anything the library throws while building or running the tokenizer becomes a FormatError naming the file.
// The coordinator uses this to tokenize datasets; `generate` uses it to decode.

import fs from 'node:fs';
import path from 'node:path';
import * as hfTokenizers from '@huggingface/tokenizers';
import { Tokenizer } from '@huggingface/tokenizers';
import { catastrophicBacktracking } from './regex-safety.ts';
import { renderChatTemplate } from './chat-template.ts';
import { DataError, FormatError, ShapeError, UnsupportedError } from './errors.ts';
import { SentencePieceTokenizer } from './sp-tokenizer.ts';

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function own(o: Obj, k: string): unknown {
  return Object.prototype.hasOwnProperty.call(o, k) ? o[k] : undefined;
}

function msg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Model types the library implements (WordLevel and others fall back to a legacy path we do not trust). */
const MODEL_TYPES = ['BPE', 'WordPiece', 'Unigram'];

/** A special token in tokenizer_config.json: a string, or an AddedToken dict {content, ...}. */
function tokenContent(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (isObj(v) && typeof own(v, 'content') === 'string') return own(v, 'content') as string;
  return null;
}

/**
 * Every `{"Regex": "..."}` pattern of the normalizer, pre-tokenizer and decoder (Split, Replace), compiled
 * exactly as the library compiles it, must be free of catastrophic backtracking (common/regex-safety.ts):
 * a hostile or careless tokenizer.json must not hang data loading.
 */
// Exported by the library at run time (its compiler of tokenizer.json patterns) but missing from its typings.
const { SplitPreTokenizer } = hfTokenizers as unknown as { SplitPreTokenizer: new (config: Obj) => { pattern: RegExp | null } };

function checkRegexes(tj: Obj, source: string): void {
  const visit = (v: unknown, path: string, depth: number): void => {
    if (depth > 12 || v === null || typeof v !== 'object') return;
    if (Array.isArray(v)) { v.forEach((x, i) => visit(x, `${path}[${i}]`, depth + 1)); return; }
    const regex = own(v as Obj, 'Regex');
    if (regex !== undefined) {
      if (typeof regex !== 'string') throw new FormatError(`${source}: ${path}.Regex must be a string`);
      let compiled: RegExp | null;
      try {
        compiled = new SplitPreTokenizer({ pattern: { Regex: regex } }).pattern;
      } catch (e) {
        throw new FormatError(`${source}: ${path}.Regex ${JSON.stringify(regex).slice(0, 120)} is not a valid regular expression: ${msg(e)}`);
      }
      const why = compiled ? catastrophicBacktracking(compiled.source, compiled.flags) : null;
      if (why) {
        throw new UnsupportedError(`${source}: ${path}.Regex ${JSON.stringify(regex).slice(0, 120)} is refused: ${why}`, {
          hint: 'this pattern could take exponential time on some inputs; rewrite it without nested or ambiguous repetition (e.g. (a+)+ → a+), or use the tokenizer.json the model was published with',
        });
      }
      return;
    }
    for (const [k, x] of Object.entries(v as Obj)) visit(x, `${path}.${k}`, depth + 1);
  };
  for (const k of ['normalizer', 'pre_tokenizer', 'decoder']) visit(own(tj, k), k, 0);
}

/** Checks what the library reads without checking it itself, so malformed files fail here with a clear message. */
function checkTokenizerJson(tj: unknown, source: string): asserts tj is Obj {
  if (!isObj(tj)) throw new FormatError(`${source}: tokenizer.json must be a JSON object`);
  const model = own(tj, 'model');
  if (!isObj(model)) throw new FormatError(`${source}: "model" must be an object`);
  const type = own(model, 'type');
  if (typeof type !== 'string' || !MODEL_TYPES.includes(type)) {
    throw new UnsupportedError(`${source}: tokenizer model type ${JSON.stringify(type)} is not supported`, { hint: `supported: ${MODEL_TYPES.join(', ')}` });
  }
  const vocab = own(model, 'vocab');
  if (type === 'Unigram' ? !Array.isArray(vocab) : !isObj(vocab)) {
    throw new FormatError(`${source}: "model.vocab" must be ${type === 'Unigram' ? 'a list of [piece, score]' : 'an object {token: id}'}`);
  }
  if (isObj(vocab)) {
    for (const [tok, id] of Object.entries(vocab)) {
      if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) throw new FormatError(`${source}: model.vocab[${JSON.stringify(tok).slice(0, 40)}] must be a non-negative integer id`);
    }
  } else if (Array.isArray(vocab)) {
    for (const p of vocab) {
      if (!Array.isArray(p) || typeof p[0] !== 'string' || typeof p[1] !== 'number') throw new FormatError(`${source}: model.vocab entries must be [piece, score]`);
    }
  }
  if (type === 'BPE') {
    const merges = own(model, 'merges');
    if (!Array.isArray(merges)) throw new FormatError(`${source}: "model.merges" must be a list`);
    for (const m of merges) {
      const ok = typeof m === 'string' ? m.includes(' ') : Array.isArray(m) && m.length === 2 && typeof m[0] === 'string' && typeof m[1] === 'string';
      if (!ok) throw new FormatError(`${source}: model.merges entry ${JSON.stringify(m)?.slice(0, 40)} must be "a b" or ["a", "b"]`);
    }
  }
  const added = own(tj, 'added_tokens') ?? [];
  if (!Array.isArray(added)) throw new FormatError(`${source}: "added_tokens" must be a list`);
  for (const t of added) {
    if (!isObj(t) || typeof own(t, 'content') !== 'string' || own(t, 'content') === '' || typeof own(t, 'id') !== 'number' || !Number.isSafeInteger(own(t, 'id')) || (own(t, 'id') as number) < 0) {
      throw new FormatError(`${source}: every added_tokens entry needs a non-empty "content" and a non-negative integer "id", found ${JSON.stringify(t)?.slice(0, 60)}`);
    }
  }
  // The library builds dense id → token arrays and walks them: one absurd id (1e9) would allocate and loop
  // for minutes. Real vocabularies are dense, so ids must stay below twice the number of tokens (+ slack).
  const count = (isObj(vocab) ? Object.keys(vocab).length : (vocab as unknown[]).length) + added.length;
  const limit = Math.min(2 * count + 1024, 1 << 24);
  const ids = isObj(vocab) ? (Object.values(vocab) as number[]) : [];
  for (const t of added as Obj[]) ids.push(own(t, 'id') as number);
  for (const id of ids) {
    if (id >= limit) throw new FormatError(`${source}: token id ${id} is far beyond the ${count} tokens defined (limit ${limit})`, { hint: 'the file is corrupt' });
  }
  for (const k of ['normalizer', 'pre_tokenizer', 'post_processor', 'decoder']) {
    const v = own(tj, k);
    if (v !== undefined && v !== null && !isObj(v)) throw new FormatError(`${source}: "${k}" must be an object or null`);
  }
}

export class TextTokenizer {
  /** Number of ids the tokenizer can produce (max id + 1 over vocab and added tokens), like `len(tokenizer)`. */
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number | null;
  readonly padId: number | null;
  /** The Jinja chat template (the "default" one when the config lists several), or null. */
  readonly chatTemplate: string | null;
  readonly source: string;
  private readonly tok: Tokenizer;
  private readonly specials: Record<string, string | undefined>;
  private readonly templateNames: string[];

  private constructor(tok: Tokenizer, config: Obj, source: string, chatTemplateOverride: string | null) {
    this.tok = tok;
    this.source = source;
    let max = -1;
    for (const id of tok.get_vocab(true).values()) if (id > max) max = id;
    this.vocabSize = max + 1;
    const special = (key: string): string | undefined => tokenContent(own(config, key)) ?? undefined;
    this.specials = { bos_token: special('bos_token'), eos_token: special('eos_token'), pad_token: special('pad_token'), unk_token: special('unk_token') };
    const idOf = (t: string | undefined): number | null => (t === undefined ? null : this.tokenToId(t));
    this.bosId = idOf(this.specials.bos_token);
    this.eosId = idOf(this.specials.eos_token);
    this.padId = idOf(this.specials.pad_token);

    const ct = chatTemplateOverride ?? own(config, 'chat_template') ?? null;
    this.templateNames = [];
    if (ct === null || typeof ct === 'string') {
      this.chatTemplate = ct;
    } else if (Array.isArray(ct)) {
      const named = new Map<string, string>();
      for (const e of ct) {
        if (!isObj(e) || typeof own(e, 'name') !== 'string' || typeof own(e, 'template') !== 'string') {
          throw new FormatError(`${source}: "chat_template" list entries must be {name, template} strings`);
        }
        named.set(own(e, 'name') as string, own(e, 'template') as string);
      }
      this.templateNames = [...named.keys()];
      this.chatTemplate = named.get('default') ?? (named.size === 1 ? [...named.values()][0] : null);
    } else {
      throw new FormatError(`${source}: "chat_template" must be a string or a list of {name, template}`);
    }
  }

  /**
   * Loads `tokenizer.json` from an HF model directory, with `tokenizer_config.json` (special tokens, chat
   * template) and `special_tokens_map.json` when present; a `chat_template.jinja` (or `chat_template.json`)
   * file overrides the config's template, as in current transformers.
   */
  static load(dir: string): TextTokenizer {
    const tp = path.join(dir, 'tokenizer.json');
    if (!fs.existsSync(tp)) {
      if (fs.existsSync(path.join(dir, 'tokenizer.model'))) {
        throw new UnsupportedError(`${dir}: only a SentencePiece tokenizer.model was found; SentencePiece-only tokenizers are not supported yet by TextTokenizer.load`, {
          hint: 'loadTokenizer(dir) reads tokenizer.model (common/sp-tokenizer.ts)',
        });
      }
      throw new FormatError(`${dir}: no tokenizer found (looked for tokenizer.json and tokenizer.model)`, { hint: 'point --model at a Hugging Face model directory' });
    }
    const tj = readJson(tp);
    const cp = path.join(dir, 'tokenizer_config.json');
    const config: Obj = {};
    const sp = path.join(dir, 'special_tokens_map.json');
    if (fs.existsSync(sp)) {
      const s = readJson(sp);
      if (!isObj(s)) throw new FormatError(`${sp}: must be a JSON object`);
      Object.assign(config, s);
    }
    if (fs.existsSync(cp)) {
      const c = readJson(cp);
      if (!isObj(c)) throw new FormatError(`${cp}: must be a JSON object`);
      // tokenizer_config.json wins over special_tokens_map.json, except for values it leaves null.
      for (const [k, v] of Object.entries(c)) if (v !== null || !(k in config)) config[k] = v;
    }
    let template: string | null = null;
    const jp = path.join(dir, 'chat_template.jinja');
    const jsp = path.join(dir, 'chat_template.json');
    if (fs.existsSync(jp)) template = fs.readFileSync(jp, 'utf8');
    else if (fs.existsSync(jsp)) {
      const j = readJson(jsp);
      if (!isObj(j) || typeof own(j, 'chat_template') !== 'string') throw new FormatError(`${jsp}: must be {"chat_template": "..."}`);
      template = own(j, 'chat_template') as string;
    }
    return TextTokenizer.build(tj, config, tp, template);
  }

  /** Builds a tokenizer from already parsed tokenizer.json and tokenizer_config.json objects. */
  static fromObjects(tokenizerJson: object, tokenizerConfig: object, source: string): TextTokenizer {
    if (!isObj(tokenizerConfig)) throw new FormatError(`${source}: tokenizer config must be a JSON object`);
    return TextTokenizer.build(tokenizerJson, tokenizerConfig, source, null);
  }

  private static build(tj: unknown, config: Obj, source: string, template: string | null): TextTokenizer {
    checkTokenizerJson(tj, source);
    // The library requires these keys to exist (null is fine); older files leave some out.
    const full: Obj = { normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, ...tj, added_tokens: own(tj, 'added_tokens') ?? [] };
    // transformers >= 4.45 defaults clean_up_tokenization_spaces to false; the library defaults it to true.
    const cfg: Obj = { ...config, clean_up_tokenization_spaces: own(config, 'clean_up_tokenization_spaces') ?? false };
    checkRegexes(full, source);
    let tok: Tokenizer;
    try {
      tok = new Tokenizer(full, cfg);
    } catch (e) {
      throw new FormatError(`${source}: cannot build the tokenizer: ${msg(e)}`, { cause: e });
    }
    return new TextTokenizer(tok, cfg, source, template);
  }

  /** Token ids of `text`; special tokens (e.g. BOS) are added by the tokenizer's post-processor unless told not to. */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== 'string') throw new DataError(`encode expects a string, got ${typeof text}`);
    let enc: { ids: number[]; tokens: string[] };
    try {
      enc = this.tok.encode(text, { add_special_tokens: opts.addSpecialTokens ?? true });
    } catch (e) {
      throw new FormatError(`${this.source}: the tokenizer failed to encode text: ${msg(e)}`, { cause: e });
    }
    // The library yields `undefined` for a piece missing from the vocab when there is no unk_token.
    const bad = enc.ids.findIndex((id) => !Number.isSafeInteger(id));
    if (bad >= 0) {
      throw new FormatError(`${this.source}: the tokenizer produced ${JSON.stringify(enc.tokens[bad])}, which is not in its vocabulary, and it has no unk_token`, {
        hint: 'the tokenizer.json is inconsistent (merges produce tokens missing from model.vocab?)',
      });
    }
    return enc.ids;
  }

  decode(ids: number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return ''; // the library rejects an empty list
    for (const id of ids) {
      if (!Number.isSafeInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new ShapeError(`token id ${id} is out of range for the tokenizer of ${this.source} (${this.vocabSize} ids)`, { hint: 'were these ids produced by another model?' });
      }
    }
    try {
      return this.tok.decode(ids, { skip_special_tokens: opts.skipSpecialTokens ?? false });
    } catch (e) {
      throw new FormatError(`${this.source}: the tokenizer failed to decode: ${msg(e)}`, { cause: e });
    }
  }

  tokenToId(token: string): number | null {
    return this.tok.token_to_id(token) ?? null;
  }

  idToToken(id: number): string | null {
    return this.tok.id_to_token(id) ?? null;
  }

  /** Renders the chat template the way transformers' `apply_chat_template(tokenize=False)` does. */
  applyChatTemplate(messages: ChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): string {
    return renderChatTemplate(this.source, this.chatTemplate, this.templateNames, this.specials, messages, opts);
  }
}

function readJson(p: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(p, 'utf8');
  } catch (e) {
    throw new FormatError(`cannot read ${p}: ${msg(e)}`, { cause: e });
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(`${p}: invalid JSON: ${msg(e)}`, { cause: e });
  }
}

/** What every tokenizer gives the rest of the system: TextTokenizer (tokenizer.json) or SentencePieceTokenizer. */
export interface LoadedTokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number | null;
  readonly padId: number | null;
  readonly chatTemplate: string | null;
  readonly source: string;
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  decode(ids: number[], opts?: { skipSpecialTokens?: boolean }): string;
  tokenToId(token: string): number | null;
  idToToken(id: number): string | null;
  applyChatTemplate(messages: ChatMessage[], opts?: { addGenerationPrompt?: boolean }): string;
}

/**
 * The tokenizer of an HF model directory: `tokenizer.json` when present (TextTokenizer), else SentencePiece's
 * `tokenizer.model` (SentencePieceTokenizer: Llama-1/2 rules, or ChatGLM2's when tokenizer_config.json names
 * ChatGLMTokenizer — narrow with `instanceof SentencePieceTokenizer` for prefixTokens / chatGlmPrompt).
 */
export function loadTokenizer(dir: string): TextTokenizer | SentencePieceTokenizer {
  if (!fs.existsSync(path.join(dir, 'tokenizer.json')) && fs.existsSync(path.join(dir, 'tokenizer.model'))) return SentencePieceTokenizer.load(dir);
  return TextTokenizer.load(dir);
}

/**
 * decode(ids) for text shown to people or written to JSON: generation stops wherever max_new_tokens says, often in
 * the middle of a character whose UTF-8 bytes span several byte-level tokens; decoding such a tail gives U+FFFD.
 * Trailing ids that decode only to U+FFFD are dropped (at most 3: a UTF-8 character has at most 4 bytes, and the
 * first byte of a sequence that is completed later is never decoded alone), as transformers' TextStreamer waits
 * for the rest of a character. A U+FFFD anywhere else, or one the ids really spell, is kept.
 */
export function decodeComplete(tok: Pick<LoadedTokenizer, 'decode'>, ids: number[], opts: { skipSpecialTokens?: boolean } = {}): string {
  const full = tok.decode(ids, opts);
  if (!full.endsWith('\uFFFD')) return full;
  for (let k = 1; k <= Math.min(3, ids.length); k++) {
    const head = tok.decode(ids.slice(0, ids.length - k), opts);
    if (!full.startsWith(head) || !/^\uFFFD*$/.test(full.slice(head.length).trimStart())) return full;
    if (!head.endsWith('\uFFFD')) return head;
  }
  return full;
}

/**
 * Text for a terminal or a JSON file: control characters (C0 except tab and newline, DEL, C1) removed — a partial
 * byte token or an untrained model can produce any of them, and they garble terminals and confuse JSON readers.
 */
export function printableText(s: string): string {
  return s.replace(/[\u0000-\u0008\u000B-\u001F\u007F-\u009F]/g, '');
}
