// Long prompts on the tiny model (context 512, the example's tokenizer): over-long prompts are refused with their
// token count and the limit, or cut to fit on the side asked for, keeping the prompt format around the text; and
// with the KV cache a long prompt is run once, then every new token costs one position — the work is linear in
// new tokens, and the wall time of a context-filling prompt is bounded.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { createBackend } from '../../core/engine/index.ts';
import { generateTokens } from '../../core/model/generate.ts';
import { encodePrompt, encodePromptsToFit } from '../../coordinator/answer.ts';
import { ConfigError } from '../../common/errors.ts';

const dir = mkdtempSync(join(tmpdir(), 'dqlora-long-'));
const { model } = tinyExampleSetup(dir, { shape: { maxPositionEmbeddings: 512 } });
const tok = loadTokenizer(model);
const cfg = loadModelConfig(model);
test.after(() => rmSync(dir, { recursive: true, force: true }));

// 2,400 characters, as in the issue: far over 512 tokens with this tokenizer.
const LONG = Array.from({ length: 200 }, (_, i) => `第${i}段#openpie#`).join('').slice(0, 2400);

test('a prompt over the context is refused with its token count, the total and the limit', () => {
  const n = encodePrompt(tok, LONG).length;
  assert.ok(n > 512, `${n} tokens`);
  assert.throws(() => encodePromptsToFit(tok, ['short', LONG], 64, { maxPositions: 512 }), (e: Error) => {
    assert.ok(e instanceof ConfigError);
    assert.match(e.message, new RegExp(`^prompt 2 \\(2400 characters\\) is ${n} tokens; with --max-new-tokens 64 that is ${n + 64}, over the model's context of 512 tokens`));
    assert.match(e.message, /--truncate left/);
    return true;
  });
  assert.throws(() => encodePromptsToFit(tok, ['short'], 512, { maxPositions: 512 }), /--max-new-tokens 512 leaves no room for a prompt/);
  // Job files name their key.
  assert.throws(() => encodePromptsToFit(tok, [LONG], 8, { maxPositions: 512, names: { maxNewTokens: 'compare.max_new_tokens' } }), /with compare\.max_new_tokens 8 .*\n  hint: shorten the prompt, lower compare\.max_new_tokens$/);
});

test('--truncate left keeps the end of the text, right keeps its start; both keep the prompt format and fit', () => {
  const empty = encodePrompt(tok, '');
  const told: [number, number, number][] = [];
  for (const side of ['left', 'right'] as const) {
    const [ids] = encodePromptsToFit(tok, [LONG], 64, { maxPositions: 512, truncate: side, onTruncate: (i, from, to) => told.push([i, from, to]) });
    assert.ok(ids.length <= 512 - 64 && ids.length > 512 - 64 - 8, `${side}: ${ids.length} tokens`);
    // The template's tail (the assistant turn) ends the prompt, its head starts it: only the text was cut.
    assert.deepEqual(ids.slice(-3), empty.slice(-3));
    assert.deepEqual(ids.slice(0, 2), empty.slice(0, 2));
    const text = tok.decode(ids);
    if (side === 'left') assert.ok(text.includes(`${LONG.slice(-40)}<|im_end|>`) && !text.includes(LONG.slice(0, 20)), 'the end survives');
    else assert.ok(text.includes(`user\n${LONG.slice(0, 40)}`) && !text.includes(LONG.slice(-20)), 'the start survives');
    assert.ok(!text.includes('\uFFFD'));
  }
  assert.equal(told.length, 2);
  assert.equal(told[0][1], encodePrompt(tok, LONG).length);
});

test('with the KV cache a context-filling prompt runs once and each new token costs one position (linear), in bounded time', async () => {
  const be = await createBackend('cpu');
  const stage = loadStage(be, model, fullModelSpec(cfg));
  const [prompt] = encodePromptsToFit(tok, [LONG], 64, { maxPositions: 512, truncate: 'left' });
  const calls: number[] = [];
  const decode = stage.decode.bind(stage);
  stage.decode = (cache, start, batch, hidden) => { calls.push(batch.T); return decode(cache, start, batch, hidden); };
  const t0 = performance.now();
  const [out] = generateTokens([stage], [prompt], { maxNewTokens: 64, eosIds: [], padId: tok.padId ?? 0 });
  const seconds = (performance.now() - t0) / 1000;
  assert.equal(out.length, 64);
  // One prefill of the whole prompt, then 63 single-position steps (the 64th token needs no forward pass).
  assert.deepEqual(calls, [prompt.length, ...new Array(63).fill(1)]);
  // About 1 s on this 2-core machine (0.9 s measured); without the cache, 64 re-runs of ~480 positions would be
  // ~60× the positions of the 511 computed here.
  assert.ok(seconds < 30, `${seconds.toFixed(1)} s for a ${prompt.length}-token prompt + 64 new tokens`);
});
