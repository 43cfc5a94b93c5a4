// Turning a record into text pieces, each marked trained (labels = its tokens) or not (labels = −100).
//
// With a chat template (tokenizer_config.json `chat_template`):
//   alpaca → messages [system?] + user(instruction + ("\n\n" + input if input)) + assistant(output), then as chat.
//   chat   → for every assistant turn i, P_i = render(messages[0..i), add_generation_prompt=true) and
//            A_i = render(messages[0..=i], add_generation_prompt=false). The text between P_i and A_i (the reply
//            plus the template's end-of-turn marker, e.g. "<|im_end|>\n") is trained; everything else is not.
//            This needs the renderings to be prefixes of one another (true for ChatML, Llama 3, Mistral, Qwen2.5);
//            a template that rewrites earlier turns (e.g. drops past reasoning) is refused with a FormatError.
//   text   → the whole text, trained, followed by EOS.
//
// Without a chat template — the DEFAULT PROMPT FORMAT (stable; changing it invalidates trained adapters):
//   alpaca:  "{system}\n\n"                       (only when system is present)
//            "### Instruction:\n{instruction}\n\n"
//            "### Input:\n{input}\n\n"            (only when input is non-empty)
//            "### Response:\n"                    ← end of prompt (not trained)
//            "{output}" + EOS token               ← completion (trained; EOS is the token id, not text)
//   chat:    system  → "{content}\n\n"
//            user    → "### Instruction:\n{content}\n\n### Response:\n"
//            assistant → "{content}" + EOS        (trained)
//   text:    "{text}" + EOS                        (trained)
// BOS handling is the tokenizer stage's job (see tokenize.ts).
import { DataError, FormatError, ConfigError } from '../../common/errors.ts';
import type { Record, ChatMessage } from './records.ts';

/** What the data pipeline needs of a tokenizer (tokenizer.json or SentencePiece; see common/tokenizer.ts). */
export interface TokenizerLike {
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  eosId: number | null;
  bosId: number | null;
  padId: number | null;
  chatTemplate: string | null;
  applyChatTemplate(messages: { role: string; content: string }[], opts?: { addGenerationPrompt?: boolean }): string;
  /**
   * Ids every sequence starts with instead of BOS (ChatGLM2: [gMASK, sop], what its tokenizer's
   * build_inputs_with_special_tokens prepends). Optional.
   */
  prefixTokens?(): number[];
  /**
   * The model's own prompt for a query and the previous (query, answer) rounds, for models without a chat
   * template (ChatGLM2: "[Round 1]\n\n问：{query}\n\n答："). Optional; without it (and without a chat template)
   * the documented default format is used.
   */
  formatQuery?(query: string, history?: [string, string][]): string;
}

/** A span of the formatted sequence. `eos`: append the tokenizer's EOS id after the text (same `trained` flag). */
export interface Piece { text: string; trained: boolean; eos?: boolean }

/** The message list an alpaca record becomes under a chat template. */
export function alpacaMessages(r: { instruction: string; input?: string; system?: string }, output?: string): ChatMessage[] {
  const msgs: ChatMessage[] = [];
  if (r.system) msgs.push({ role: 'system', content: r.system });
  msgs.push({ role: 'user', content: r.input ? `${r.instruction}\n\n${r.input}` : r.instruction });
  if (output !== undefined) msgs.push({ role: 'assistant', content: output });
  return msgs;
}

/** The default (template-less) prompt for an alpaca record: everything before the response. */
export function defaultAlpacaPrompt(r: { instruction: string; input?: string; system?: string }): string {
  return (r.system ? `${r.system}\n\n` : '') + `### Instruction:\n${r.instruction}\n\n`
    + (r.input ? `### Input:\n${r.input}\n\n` : '') + '### Response:\n';
}

/**
 * The prompt text a model trained on this pipeline expects for generation: the template with the generation
 * prompt when the tokenizer has one, else the default format. `generate` uses this so it matches training.
 */
export function formatPrompt(r: { instruction: string; input?: string; system?: string }, tok: TokenizerLike): string {
  if (tok.chatTemplate) return render(tok, alpacaMessages(r), true);
  if (tok.formatQuery) return tok.formatQuery(queryText(r));
  return defaultAlpacaPrompt(r);
}

/** The single query text of an alpaca record for models with their own round format (system first, then input). */
function queryText(r: { instruction: string; input?: string; system?: string }): string {
  return (r.system ? `${r.system}\n\n` : '') + r.instruction + (r.input ? `\n\n${r.input}` : '');
}

/**
 * Models with their own round format (ChatGLM2) and no chat template: the prompt is formatQuery(query, history)
 * and only the last answer is trained (the official ChatGLM2 fine-tuning recipe: earlier rounds are history).
 */
function formatWithQuery(rec: Record, tok: TokenizerLike & { formatQuery: NonNullable<TokenizerLike['formatQuery']> }): Piece[] {
  if (rec.kind === 'alpaca') {
    return [{ text: tok.formatQuery(queryText(rec)), trained: false }, { text: rec.output, trained: true, eos: needEos(tok) }];
  }
  if (rec.kind !== 'chat') throw new Error('unreachable');
  const history: [string, string][] = [];
  let system = '', query: string | undefined, last: { q: string; a: string } | undefined;
  for (const m of rec.messages) {
    if (m.role === 'system') system += `${m.content}\n\n`;
    else if (m.role === 'user') query = (query === undefined ? '' : `${query}\n\n`) + m.content;
    else {
      if (query === undefined) throw new DataError('an assistant turn without a user turn before it cannot be put in the model\'s round format');
      if (last) history.push([last.q, last.a]);
      last = { q: (history.length === 0 ? system : '') + query, a: m.content };
      query = undefined;
    }
  }
  if (!last) throw new DataError('a chat record needs an assistant turn');
  return [{ text: tok.formatQuery(last.q, history), trained: false }, { text: last.a, trained: true, eos: needEos(tok) }];
}

/** Splits a record into trained / untrained text pieces (see the module comment for the exact format). */
export function formatRecord(rec: Record, tok: TokenizerLike): Piece[] {
  switch (rec.kind) {
    case 'text':
      return [{ text: rec.text, trained: true, eos: needEos(tok) }];
    case 'alpaca':
      if (tok.chatTemplate) return formatChatTemplated(alpacaMessages(rec, rec.output), tok);
      if (tok.formatQuery) return formatWithQuery(rec, tok as Parameters<typeof formatWithQuery>[1]);
      return [{ text: defaultAlpacaPrompt(rec), trained: false }, { text: rec.output, trained: true, eos: needEos(tok) }];
    case 'chat':
      if (tok.chatTemplate) return formatChatTemplated(rec.messages, tok);
      if (tok.formatQuery) return formatWithQuery(rec, tok as Parameters<typeof formatWithQuery>[1]);
      return formatChatDefault(rec.messages, tok);
    case 'tokens':
      throw new DataError('a pre-tokenized record ({input_ids}) has no text to format', { hint: 'it is used as it is by tokenization; prompts for generation need text' });
  }
}

function needEos(tok: TokenizerLike): true {
  if (tok.eosId === null) {
    throw new ConfigError('the tokenizer has no EOS token and no chat template: trained answers would never learn to stop',
      { hint: 'set "eos_token" (or a "chat_template") in tokenizer_config.json' });
  }
  return true;
}

function formatChatDefault(messages: ChatMessage[], tok: TokenizerLike): Piece[] {
  const pieces: Piece[] = [];
  let pending = ''; // untrained text accumulated since the last assistant turn
  for (const m of messages) {
    if (m.role === 'system') pending += `${m.content}\n\n`;
    else if (m.role === 'user') pending += `### Instruction:\n${m.content}\n\n### Response:\n`;
    else {
      if (pending) pieces.push({ text: pending, trained: false });
      pending = '';
      pieces.push({ text: m.content, trained: true, eos: needEos(tok) });
    }
  }
  if (pending) pieces.push({ text: pending, trained: false });
  return pieces;
}

function render(tok: TokenizerLike, messages: ChatMessage[], addGenerationPrompt: boolean): string {
  try {
    return tok.applyChatTemplate(messages, { addGenerationPrompt });
  } catch (e) {
    if (e instanceof FormatError || e instanceof DataError) throw e;
    throw new DataError(`chat template failed on a conversation of ${messages.length} messages `
      + `(roles ${messages.map((m) => m.role).join(',')}): ${(e as Error).message ?? String(e)}`,
    { hint: 'some templates require strictly alternating user/assistant roles or a leading system message', cause: e });
  }
}

function formatChatTemplated(messages: ChatMessage[], tok: TokenizerLike): Piece[] {
  // Renderings of the first k messages, memoised: for the usual [system?, user, assistant] the full rendering is
  // also the last "with reply" one, so a record costs two renders, not three.
  const memo = new Map<string, string>();
  const prefix = (k: number, gen: boolean): string => {
    const key = `${k}:${gen}`;
    let r = memo.get(key);
    if (r === undefined) { r = render(tok, messages.slice(0, k), gen); memo.set(key, r); }
    return r;
  };
  const full = prefix(messages.length, false);
  const pieces: Piece[] = [];
  let pos = 0;
  for (let i = 0; i < messages.length; i++) {
    if (messages[i].role !== 'assistant') continue;
    const prompt = prefix(i, true);
    const withReply = prefix(i + 1, false);
    if (!withReply.startsWith(prompt) || !full.startsWith(withReply) || prompt.length < pos) {
      const [a, b] = !withReply.startsWith(prompt) ? [prompt, withReply] : [withReply, full];
      const at = firstDiff(a, b);
      throw new FormatError('the chat template is not prefix-stable: rendering the conversation up to assistant turn '
        + `${i} gives text that is not a prefix of the longer rendering (first difference at character ${at}: `
        + `${JSON.stringify(a.slice(at, at + 30))} vs ${JSON.stringify(b.slice(at, at + 30))})`,
      { hint: 'prompt/answer boundaries cannot be found for label masking; use a template that only appends '
        + 'when a turn is added (tokenizer_config.json "chat_template")' });
    }
    if (prompt.length > pos) pieces.push({ text: full.slice(pos, prompt.length), trained: false });
    pieces.push({ text: withReply.slice(prompt.length), trained: true });
    pos = withReply.length;
  }
  if (full.length > pos) pieces.push({ text: full.slice(pos), trained: false });
  return pieces;
}

function firstDiff(a: string, b: string): number {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}
