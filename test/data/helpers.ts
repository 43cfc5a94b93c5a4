// Test helpers: a tiny character-level tokenizer with exactly the TokenizerLike shape, and temp files.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Template } from '@huggingface/jinja';
import type { TokenizerLike } from '../../coordinator/data/tokenize.ts';

/** Special tokens of the tiny tokenizer: recognised as whole strings inside text, like HF added tokens. */
export const TINY_SPECIALS = ['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>'] as const;
export const PAD = 0, BOS = 1, EOS = 2, IM_START = 3, IM_END = 4;
/** Every other character c encodes to 100 + its code point, so expected ids are easy to write down. */
export const charId = (c: string): number => 100 + c.codePointAt(0)!;
export const ids = (s: string): number[] => tinyEncode(s);

export const CHATML = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
  + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

function tinyEncode(text: string): number[] {
  const out: number[] = [];
  let i = 0;
  outer: while (i < text.length) {
    for (let s = 0; s < TINY_SPECIALS.length; s++) {
      if (text.startsWith(TINY_SPECIALS[s], i)) { out.push(s); i += TINY_SPECIALS[s].length; continue outer; }
    }
    const c = String.fromCodePoint(text.codePointAt(i)!);
    out.push(charId(c)); i += c.length;
  }
  return out;
}

export function tinyDecode(idList: ArrayLike<number>): string {
  let s = '';
  for (let i = 0; i < idList.length; i++) s += idList[i] < 100 ? TINY_SPECIALS[idList[i]] : String.fromCodePoint(idList[i] - 100);
  return s;
}

/** A TokenizerLike over the tiny vocabulary; `template` null → the default prompt format is used. */
export function tinyTokenizer(opts: { template?: string | null; bos?: boolean; eos?: boolean } = {}): TokenizerLike {
  const template = opts.template ?? null;
  const compiled = template ? new Template(template) : null;
  return {
    encode: (text) => tinyEncode(text),
    eosId: opts.eos === false ? null : EOS,
    bosId: opts.bos === false ? null : BOS,
    padId: PAD,
    chatTemplate: template,
    applyChatTemplate(messages, o = {}) {
      if (!compiled) throw new Error('no chat template');
      return compiled.render({ messages, add_generation_prompt: o.addGenerationPrompt ?? false, bos_token: '<s>', eos_token: '</s>' });
    },
  };
}

export function tempDir(prefix = 'dqlora-data-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function writeFile(dir: string, name: string, content: string | Uint8Array): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, content);
  return p;
}

export const jsonl = (rows: unknown[]): string => rows.map((r) => JSON.stringify(r)).join('\n') + '\n';
