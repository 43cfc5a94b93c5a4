// Chat templates (tokenizer_config.json `chat_template`, Jinja) rendered the way transformers'
// `apply_chat_template(tokenize=False)` does, for every tokenizer kind. Compiled templates are cached by text.
import { Template } from '@huggingface/jinja';
import { ConfigError, DataError, FormatError } from './errors.ts';

const compiled = new Map<string, Template>();

function msg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Renders `template` over `messages`. `specials` are the token strings templates may reference (bos_token,
 * eos_token, …); `templateNames` the names a multi-template config listed (for the error when none is "default").
 */
export function renderChatTemplate(
  source: string, template: string | null, templateNames: readonly string[], specials: Readonly<Record<string, string | undefined>>,
  messages: readonly { role: string; content: string }[], opts: { addGenerationPrompt?: boolean } = {},
): string {
  if (template === null) {
    const why = templateNames.length > 1 ? ` (it lists ${templateNames.join(', ')} but none is named "default")` : '';
    throw new ConfigError(`${source}: the tokenizer has no chat template${why}`, {
      hint: 'use a prompt template in the job config, or add "chat_template" to tokenizer_config.json',
    });
  }
  let t = compiled.get(template);
  if (!t) {
    try {
      t = new Template(template);
    } catch (e) {
      throw new FormatError(`${source}: the chat template does not parse: ${msg(e)}`, { cause: e });
    }
    compiled.set(template, t);
  }
  try {
    return t.render({
      messages: messages.map((m) => ({ role: m.role, content: m.content })),
      add_generation_prompt: opts.addGenerationPrompt ?? false,
      ...Object.fromEntries(Object.entries(specials).filter(([, v]) => v !== undefined)),
    });
  } catch (e) {
    // Templates call raise_exception() for conversations they refuse (e.g. roles that do not alternate).
    throw new DataError(`${source}: the chat template rejected the conversation: ${msg(e)}`, { cause: e });
  }
}
