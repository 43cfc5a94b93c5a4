// `coordinator start` on a real terminal (a pseudo-terminal from util-linux `script`): what a person sees, played
// onto a screen model. Log lines (readable, not JSON), the status page URL and the results print as whole lines;
// the progress bar is drawn and finally erased, and no line on the screen has a piece of the bar in it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, appendFileSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tinyExampleSetup } from '../helpers/tiny.ts';

const BIN = join(import.meta.dirname, '..', '..', 'bin', 'coordinator.js');
const skip = spawnSync('script', ['--version'], { stdio: 'ignore' }).error ? 'util-linux script not installed' : false;

/** Terminal output → the lines left on the screen (\r, ESC[2K, \n, SGR colours; anything else fails the test). */
function screen(bytes: string): string[] {
  const lines = [''];
  let col = 0;
  for (let i = 0; i < bytes.length; i++) {
    const ch = bytes[i];
    if (ch === '\r') { col = 0; continue; }
    if (ch === '\n') { lines.push(''); col = 0; continue; }
    if (ch === '\x1b') {
      const m = /^\x1b\[([0-9;?]*)([A-Za-z])/.exec(bytes.slice(i));
      assert.ok(m, `unexpected escape ${JSON.stringify(bytes.slice(i, i + 10))}`);
      if (m[2] === 'K') lines[lines.length - 1] = '';
      else assert.equal(m[2], 'm', `unexpected escape ${m[0]}`);
      i += m[0].length - 1;
      continue;
    }
    const cur = lines[lines.length - 1];
    lines[lines.length - 1] = cur.slice(0, col).padEnd(col) + ch + cur.slice(col + 1);
    col++;
  }
  return lines;
}

test('on a terminal: readable log lines and results above a progress bar that is never broken, then erased', { skip, timeout: 120_000 }, () => {
  const work = mkdtempSync(join(tmpdir(), 'dqlora-tty-'));
  const { trainPath, validationPath } = tinyExampleSetup(work, { shape: { numLayers: 2 } });
  appendFileSync(trainPath, '{"instruction": "broken line\n');   // a bad line, skipped: a warning on screen
  writeFileSync(join(work, 'job.yaml'), [
    'model: model', 'output_dir: run', 'backend: cpu',
    `data: { train: ${trainPath}, validation: ${validationPath}, max_length: 64, on_error: skip }`,
    'lora: { r: 4, alpha: 8, target_modules: all-linear }',
    'training: { max_steps: 6, micro_batch_size: 8, lr: 3.0e-3, eval_every: 3, save_every: 2, log_every: 2 }', '',
  ].join('\n'));
  const cmd = `stty cols 110 rows 40; DQLORA_LOG_LEVEL=info '${process.execPath}' '${BIN}' start -c '${join(work, 'job.yaml')}'`;
  const r = spawnSync('script', ['-qefc', cmd, '/dev/null'], { encoding: 'utf8', timeout: 110_000, env: { ...process.env, NODE_TEST_CONTEXT: '' } });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  const raw = r.stdout;
  if (process.env.DQLORA_TTY_DUMP) writeFileSync(process.env.DQLORA_TTY_DUMP, raw);
  assert.ok(raw.includes('train |'), 'the bar was drawn');
  assert.match(raw, /\x1b\[33mWARN /, 'the warning is marked in yellow');
  const lines = screen(raw).filter((l) => l.trim() !== '');
  assert.equal(lines.filter((l) => l.includes('train |')).length, 0, `no piece of the bar left on screen:\n${lines.join('\n')}`);
  const log = /^\d\d:\d\d:\d\d (INFO |WARN |ERROR) \w[\w-]*: /;
  for (const l of lines) assert.match(l, new RegExp(`${log.source}|^status page: http://127\\.0\\.0\\.1:\\d+ |^trained 6 steps |^adapter saved to `), `a whole line: ${JSON.stringify(l)}`);
  assert.ok(lines.some((l) => /WARN  data: skipped bad dataset lines  file=\S+ skipped=1/.test(l)));
  assert.ok(lines.some((l) => /INFO  train: checkpoint written  step=4 dir=\S+step-000004 /.test(l)));
  assert.ok(lines.some((l) => /INFO  train: eval  step=3 evalLoss=/.test(l)));
  assert.ok(lines.some((l) => /INFO  train: job finished  status=succeeded step=6 total=6 /.test(l)));
  for (const f of ['train_log.jsonl', 'loss.svg', 'status.json']) assert.ok(existsSync(join(work, 'run', f)), f);
  assert.equal(existsSync(join(work, 'run', 'status-url')), false, 'status-url is removed when the server stops');
  assert.equal(readFileSync(join(work, 'run', 'train_log.jsonl'), 'utf8').trim().split('\n').filter((l) => l.includes('"loss"')).length, 3, 'log_every 2: steps 2, 4, 6');
});
