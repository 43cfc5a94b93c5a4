// Every command, run the way a user gets it wrong: bad paths, bad option values, a typo in the environment. Each
// must fail fast (before any model is loaded), name the flag or job.yaml key, print no stack trace, and exit with
// the documented code (README "Exit codes": 2 usage/config, 3 data, 1 runtime, 130 interrupted).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { EXIT } from '../../common/errors.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const BIN = join(ROOT, 'bin', 'coordinator.js');
const work = mkdtempSync(join(tmpdir(), 'dqlora-cli-errors-'));
const { model, trainPath } = tinyExampleSetup(work, { shape: { maxPositionEmbeddings: 512 } });
test.after(() => rmSync(work, { recursive: true, force: true }));

const file = join(work, 'a-file');
writeFileSync(file, 'not a directory\n');
const missing = join(work, 'missing');

function cli(args: string[], env: NodeJS.ProcessEnv = {}, input?: string): { code: number; out: string; err: string; ms: number } {
  const t0 = Date.now();
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: work, encoding: 'utf8', timeout: 120_000, input, env: { ...process.env, DQLORA_LOG_LEVEL: 'warn', ...env } });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr, ms: Date.now() - t0 };
}

/** A failure as the issue asks: the documented code, the expected text, no stack trace, nothing on stdout. */
function fails(args: string[], code: number, expect: RegExp, env: NodeJS.ProcessEnv = {}): void {
  const r = cli(args, env);
  const what = `coordinator ${args.join(' ')}`;
  assert.equal(r.code, code, `${what}: exit ${r.code}\n${r.err}`);
  assert.match(r.err, expect, what);
  assert.doesNotMatch(r.err, /^\s+at .+:\d+:\d+\)?$/m, `${what}: stack trace in\n${r.err}`);
  assert.doesNotMatch(r.err, /internal error/, what);
}

function job(name: string, lines: string[]): string {
  const p = join(work, name);
  writeFileSync(p, ['model: model', 'backend: cpu', ...lines, ''].join('\n'));
  return p;
}

test('start: job paths are checked before loading, naming the job.yaml key (or the flag that overrode it)', () => {
  const data = `data: { train: ${trainPath} }`;
  fails(['start', '-c', missing], EXIT.usage, /--config: .*missing does not exist/);
  fails(['start', '-c', job('out-file.yaml', ['output_dir: a-file', data])], EXIT.usage, /out-file\.yaml: output_dir: .*a-file is a file, not a directory\n {2}hint: choose another output_dir in .*out-file\.yaml/);
  fails(['start', '-c', job('out-under-file.yaml', ['output_dir: a-file/run', data])], EXIT.usage, /output_dir: cannot create .*a-file\/run: .*a-file is a file/);
  fails(['start', '-c', job('ok.yaml', ['output_dir: run', data]), '--output', join(file, 'x')], EXIT.usage, /^error: --output: cannot create/m);
  fails(['start', '-c', job('steps.yaml', ['output_dir: run', data]), '--max-steps', '0'], EXIT.usage, /--max-steps must be an integer ≥ 1, got "0"/);
  fails(['start', '-c', job('train-dir.yaml', ['output_dir: run', `data: { train: ${work} }`])], EXIT.usage, /data\.train: .* is a directory, not a file/);
  fails(['start', '-c', job('val-missing.yaml', ['output_dir: run', `data: { train: ${trainPath}, validation: nope.jsonl }`])], EXIT.usage, /data\.validation: .*nope\.jsonl does not exist/);
  const m = join(work, 'm.yaml');
  writeFileSync(m, `model: missing\noutput_dir: run\ndata: { train: ${trainPath} }\n`);
  fails(['start', '-c', m], EXIT.usage, /m\.yaml: model: .*missing does not exist\n {2}hint: point model in .*m\.yaml at a Hugging Face model directory/);
  fails(['start', '-c', job('long-compare.yaml', ['output_dir: run', data, 'compare: { prompts: [x], max_new_tokens: 600 }'])], EXIT.usage, /compare\.max_new_tokens .* 600 leaves no room for a prompt in the model's context of 512/);
  const empty = join(work, 'empty.jsonl');
  writeFileSync(empty, '');
  fails(['start', '-c', job('empty.yaml', ['output_dir: run-empty', `data: { train: ${empty}, validation: ${trainPath} }`]), '--no-progress'], EXIT.data, /no training example left from .*empty\.jsonl \(0 records read, 0 dropped/);
  const bad = join(work, 'bad.jsonl');
  writeFileSync(bad, '{"instruction": "a", "output": "b"}\n{"instruction": 1}\n');
  fails(['start', '-c', job('bad-data.yaml', ['output_dir: run-bad', `data: { train: ${bad} }`]), '--no-progress'], EXIT.data, /bad\.jsonl:2: .*\n.*or set data\.on_error: skip in the job file/);
});

test('generate: model, adapter and prompt files are checked, over-long prompts refused, sampling options validated', () => {
  fails(['generate', '--model', missing, 'x'], EXIT.usage, /--model: .*missing does not exist/);
  fails(['generate', '--model', file, 'x'], EXIT.usage, /--model: .*a-file is a file, not a model directory/);
  fails(['generate', '--model', work, 'x'], EXIT.usage, /--model: .* has no config\.json/);
  const noWeights = join(work, 'no-weights'), noTokenizer = join(work, 'no-tokenizer');
  for (const d of [noWeights, noTokenizer]) { mkdirSync(d); copyFileSync(join(model, 'config.json'), join(d, 'config.json')); }
  copyFileSync(join(model, 'model.safetensors'), join(noTokenizer, 'model.safetensors'));
  fails(['generate', '--model', noWeights, 'x'], EXIT.usage, /--model: .*no-weights has config\.json but no weights/);
  fails(['generate', '--model', noTokenizer, 'x'], EXIT.usage, /--model: .*no-tokenizer has no tokenizer \(tokenizer\.json or tokenizer\.model\)/);
  fails(['generate', '--model', model, '--adapter', model, 'x'], EXIT.usage, /--adapter: .* has no adapter_config\.json/);
  fails(['generate', '--model', model, '--prompt-file', missing], EXIT.usage, /--prompt-file: .*missing does not exist/);
  fails(['generate', '--model', model, '--prompt-file', work], EXIT.usage, /--prompt-file: .* is a directory/);
  fails(['generate', '--model', model, '--temperature', '-1', 'x'], EXIT.usage, /--temperature must be a number in \[0, ∞\), got "-1"/);
  fails(['generate', '--model', model, '--top-p', '1.5', 'x'], EXIT.usage, /--top-p must be a number in \(0, 1\]/);
  fails(['generate', '--model', model, '--top-k', '2.5', 'x'], EXIT.usage, /--top-k must be an integer ≥ 0/);
  fails(['generate', '--model', model, '--max-new-tokens', '0', 'x'], EXIT.usage, /--max-new-tokens must be an integer ≥ 1/);
  fails(['generate', '--model', model, '--truncate', 'middle', 'x'], EXIT.usage, /--truncate.*Allowed choices are left, right/);
  const long = join(work, 'long.txt');
  writeFileSync(long, '拓数派#openpie#数据库。'.repeat(200) + '\n');
  const r = cli(['generate', '--model', model, '--prompt-file', long, '--max-new-tokens', '16']);
  assert.equal(r.code, EXIT.usage, r.err);
  assert.match(r.err, /^error: prompt 1 \(3200 characters\) is \d+ tokens; with --max-new-tokens 16 that is \d+, over the model's context of 512 tokens \(max_position_embeddings\)\n {2}hint: .*--truncate left/);
  assert.ok(r.ms < 15_000, `refused in ${r.ms} ms, before the model is loaded`);
});

test('generate: prompts from a file and from stdin; --truncate says what it cut', () => {
  const long = join(work, 'long2.txt');
  writeFileSync(long, '拓数派#openpie#数据库。'.repeat(200) + '\n');
  const r = cli(['generate', '--model', model, '--backend', 'cpu', '--prompt-file', long, '--truncate', 'left', '--max-new-tokens', '4']);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /^prompt 1: truncated on the left from \d+ to \d+ tokens \(context 512 = prompt \+ --max-new-tokens 4\)$/m);
  assert.match(r.out, /━━ 拓数派#openpie#数据库。.*… \(3200 characters\)/);
  assert.doesNotMatch(r.out, /\uFFFD/, 'no U+FFFD from a cut character');
  const s = cli(['generate', '--model', model, '--backend', 'cpu', '--max-new-tokens', '2', '-'], {}, '从标准输入\n');
  assert.equal(s.code, 0, s.err);
  assert.match(s.out, /━━ 从标准输入\n {2}base model : /);
});

test('eval, quantize, merge: bad paths and values name the flag; a malformed line hints --on-error skip', () => {
  fails(['eval', '--model', model, '--data', missing], EXIT.usage, /--data: .*missing does not exist/);
  fails(['eval', '--model', model, '--data', trainPath, '--max-length', '0'], EXIT.usage, /--max-length must be an integer ≥ 2, got "0"/);
  fails(['eval', '--model', model, '--data', trainPath, '--batch-size', '0'], EXIT.usage, /--batch-size must be an integer ≥ 1/);
  const bad = join(work, 'bad-eval.jsonl');
  writeFileSync(bad, '{"instruction": "a", "output": "b"}\nnot json\n');
  fails(['eval', '--model', model, '--data', bad, '--backend', 'cpu'], EXIT.data, /bad-eval\.jsonl:2: invalid JSON.*\n.*or set --on-error skip to leave bad lines out/);
  fails(['quantize', '--model', model, '--out', file], EXIT.usage, /--out: .*a-file is a file, not a directory/);
  fails(['quantize', '--model', model, '--out', join(file, 'q')], EXIT.usage, /--out: cannot create/);
  fails(['quantize', '--model', missing, '--out', join(work, 'q')], EXIT.usage, /--model: .*missing does not exist/);
  fails(['quantize', '--model', model, '--out', join(work, 'q'), '--blocksize', '48'], EXIT.usage, /--blocksize.*Allowed choices are 32, 64/);
  const q = join(work, 'q');
  assert.equal(cli(['quantize', '--model', model, '--out', q]).code, 0);
  fails(['quantize', '--model', model, '--out', q], EXIT.usage, /already holds a quantized model.*\n {2}hint: pass --force to replace it/);
  assert.equal(cli(['quantize', '--model', model, '--out', q, '--force']).code, 0, '--force replaces it');
  const adapter = join(work, 'adapter');
  mkdirSync(adapter);
  fails(['merge', '--model', model, '--adapter', missing, '--out', join(work, 'mg')], EXIT.usage, /--adapter: .*missing does not exist/);
  fails(['merge', '--model', model, '--adapter', adapter, '--out', join(work, 'mg')], EXIT.usage, /--adapter: .*adapter has no adapter_config\.json/);
  writeFileSync(join(adapter, 'adapter_config.json'), readFileSync(join(model, 'config.json')));
  fails(['merge', '--model', model, '--adapter', adapter, '--out', file], EXIT.usage, /--out: .*a-file is a file/);
  fails(['merge', '--model', model, '--adapter', adapter, '--out', model], EXIT.usage, /--out: .* already holds a model \(config\.json\)/);
});

test('usage: --version, required options marked in --help, unknown commands and DQLORA_LOG_LEVEL typos exit 2', () => {
  const v = cli(['--version']);
  assert.equal(v.code, 0);
  assert.equal(v.out.trim(), (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version);
  for (const [cmd, required] of [['generate', ['--model']], ['eval', ['--model', '--data']], ['quantize', ['--model', '--out']], ['merge', ['--model', '--adapter', '--out']]] as const) {
    const h = cli([cmd, '--help']);
    assert.equal(h.code, 0);
    const flat = h.out.replace(/\s+/g, ' ');
    for (const flag of required) assert.match(flat, new RegExp(` ${flag} <\\w+> (?:(?! --).)*\\(required`), `${cmd} --help marks ${flag}`);
  }
  fails(['generate', 'x'], EXIT.usage, /required option '--model <dir>' not specified/);
  fails(['bogus'], EXIT.usage, /unknown command 'bogus'/);
  fails(['generate', '--model', model, 'x'], EXIT.usage, /DQLORA_LOG_LEVEL=verbose is not a log level\n {2}hint: use one of fatal, error, warn, info, debug, trace, silent/, { DQLORA_LOG_LEVEL: 'verbose' });
  if (!process.env.CUDA_VISIBLE_DEVICES && spawnSync('nvidia-smi', ['-L']).status !== 0) {
    fails(['generate', '--model', model, '--backend', 'cuda', 'x'], EXIT.usage, /^error: --backend cuda: .*\n {2}hint: use --backend cpu/);
  }
});

test('Ctrl-C ends a waiting command at once: killed by SIGINT, which the shell reports as 130 (128 + 2)', async () => {
  const p = spawn(process.execPath, [BIN, 'generate', '--model', model, '--backend', 'cpu', '-'], { cwd: work, env: { ...process.env, DQLORA_LOG_LEVEL: 'warn' } });
  // stdin is a pipe left open: the command waits for its prompt, as a user would find it waiting.
  await new Promise((r) => setTimeout(r, 1500));
  p.kill('SIGINT');
  const [code, signal] = await new Promise<[number | null, string | null]>((r) => p.on('exit', (c, s) => r([c, s])));
  assert.deepEqual([code, signal], [null, 'SIGINT']);
  assert.equal(128 + 2, EXIT.interrupted);
});
