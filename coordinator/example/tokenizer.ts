// The example's tokenizer files: a byte-level BPE trained on the example's text (bpe.ts) with a ChatML template.
//
// Conventions (a small Qwen/Llama-3 hybrid):
//   <|begin_of_text|> BOS — written by the chat template itself as literal text (not via `bos_token`, so the
//                     rendering does not depend on which template variables a caller passes), and NOT added by
//                     the tokenizer's post-processor: encode(text) gives exactly the tokens of text.
//   <|im_start|>, <|im_end|>  ChatML turn markers; <|im_end|> is also EOS, so generation stops at end of turn.
//   <|end_of_text|>   document end (unused by the chat format, kept for raw-text records).
//   <|pad|>           padding.
import fs from 'node:fs';
import path from 'node:path';
import { trainByteLevelBpe, type TokenizerJson } from './bpe.ts';

export const EXAMPLE_SPECIAL_TOKENS = ['<|begin_of_text|>', '<|end_of_text|>', '<|im_start|>', '<|im_end|>', '<|pad|>'] as const;
/** Upper bound on the example's vocabulary (bytes + merges + specials); small so the LM head is cheap on a CPU. */
export const EXAMPLE_VOCAB_SIZE = 2048;

/** ChatML; system optional. Prompt for generation ends with "<|im_start|>assistant\n"; a turn ends "<|im_end|>\n". */
export const EXAMPLE_CHAT_TEMPLATE =
  "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
  + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

export function exampleTokenizerConfig(tj: TokenizerJson): object {
  const added_tokens_decoder: { [id: string]: object } = {};
  for (const t of tj.added_tokens) {
    added_tokens_decoder[String(t.id)] = { content: t.content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true };
  }
  return {
    added_tokens_decoder,
    add_bos_token: false,
    add_eos_token: false,
    bos_token: '<|begin_of_text|>',
    eos_token: '<|im_end|>',
    pad_token: '<|pad|>',
    unk_token: null,
    additional_special_tokens: ['<|im_start|>', '<|im_end|>', '<|end_of_text|>'],
    chat_template: EXAMPLE_CHAT_TEMPLATE,
    clean_up_tokenization_spaces: false,
    model_max_length: 512,
    tokenizer_class: 'PreTrainedTokenizerFast',
  };
}

/**
 * Trains the BPE on `texts` (plus the chat template's role words) and writes tokenizer.json,
 * tokenizer_config.json and special_tokens_map.json into `dir`. Returns the vocabulary size actually reached
 * (≤ EXAMPLE_VOCAB_SIZE: merging stops when no pair occurs twice) — the model's vocab_size must be at least this.
 */
export function writeExampleTokenizer(dir: string, texts: string[]): { vocabSize: number } {
  fs.mkdirSync(dir, { recursive: true });
  // The role lines appear in every formatted sample; twice each is enough for them to get merged.
  const roles = ['<|im_start|>system\n', '<|im_start|>user\n', '<|im_start|>assistant\n'];
  const corpus = [...texts, ...roles, ...roles];
  const tj = trainByteLevelBpe(corpus, { vocabSize: EXAMPLE_VOCAB_SIZE, specialTokens: [...EXAMPLE_SPECIAL_TOKENS], maxNonAsciiChars: 2 });
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(tj, null, 2) + '\n');
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(exampleTokenizerConfig(tj), null, 2) + '\n');
  fs.writeFileSync(path.join(dir, 'special_tokens_map.json'), JSON.stringify({
    bos_token: '<|begin_of_text|>', eos_token: '<|im_end|>', pad_token: '<|pad|>',
    additional_special_tokens: ['<|im_start|>', '<|im_end|>', '<|end_of_text|>'],
  }, null, 2) + '\n');
  return { vocabSize: Object.keys(tj.model.vocab).length };
}
