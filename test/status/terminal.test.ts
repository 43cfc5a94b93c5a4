// Terminal output as a person sees it: the bytes written to a (fake) terminal are played on a small screen model
// (\r, erase-line, newline, printable characters), and the screen must show whole log lines with the progress bar
// alone on the last line — never a log line run into the bar. Warnings are marked; without a TTY it is JSON.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { Terminal, fitWidth, displayWidth } from '../../common/terminal.ts';
import { logger, rootLogger, setLogFormat, setLogTerminal, prettyLine, logFormat } from '../../common/log.ts';
import { progress } from '../../common/progress.ts';
import { TerminalObserver } from '../../coordinator/status/terminal.ts';

/** Plays terminal output onto a list of lines (only what our writers emit: \r, ESC[2K, \n, ESC[..m colours). */
class Screen {
  lines: string[] = [''];
  private col = 0;
  readonly isTTY = true;
  constructor(readonly columns = 72) {}
  write(s: string): void {
    for (let i = 0; i < s.length; i++) {
      const ch = s[i];
      if (ch === '\r') { this.col = 0; continue; }
      if (ch === '\n') { this.lines.push(''); this.col = 0; continue; }
      if (ch === '\x1b') {
        const m = /^\x1b\[([0-9;]*)([A-Za-z])/.exec(s.slice(i));
        assert.ok(m, `unknown escape at ${JSON.stringify(s.slice(i, i + 8))}`);
        if (m[2] === 'K' && m[1] === '2') this.lines[this.lines.length - 1] = '';
        else assert.equal(m[2], 'm', `only colours and erase-line, got ${m[0]}`);
        i += m[0].length - 1;
        continue;
      }
      const cur = this.lines[this.lines.length - 1];
      this.lines[this.lines.length - 1] = cur.slice(0, this.col) + ch + cur.slice(this.col + 1);
      this.col++;
    }
  }
}

const prevFormat = logFormat(), prevLevel = rootLogger.level;
after(() => { setLogFormat(prevFormat); rootLogger.level = prevLevel; });

const TIME = /^\d\d:\d\d:\d\d (INFO |WARN |ERROR) /;

test('log lines print above the progress bar, which stays whole on the last line; warnings are marked WARN in yellow', () => {
  const screen = new Screen(72);
  const term = new Terminal(screen);
  const prev = setLogTerminal(term);
  setLogFormat('pretty'); rootLogger.level = 'info';
  try {
    const log = logger('data');
    let t = 0;
    const bar = progress('train', log, { tty: true, terminal: term, now: () => (t += 100) });
    const check = (barShown: boolean): void => {
      const body = screen.lines.slice(0, -1);
      for (const l of body) assert.match(l, TIME, `a whole log line above the bar: ${JSON.stringify(l)}`);
      const last = screen.lines.at(-1)!;
      if (barShown) { assert.match(last, /^train \|[█░]{30}\| \d+\/10/); assert.ok(displayWidth(last) <= 71, 'the bar never wraps'); }
      else assert.equal(last, '');
    };
    log.info({ file: 'train.jsonl', records: 300 }, 'dataset ready');
    check(false);
    for (let s = 1; s <= 10; s++) {
      bar.update(s, 10, `loss ${(3 / s).toFixed(4)} | lr 2.00e-04 | 1234 tok/s | eta ${10 - s}s | a long detail that must be cut to the terminal width`);
      check(true);
      if (s === 3) { log.warn({ file: 'train.jsonl', skipped: 2 }, 'skipped bad dataset lines'); check(true); }
      if (s === 6) { log.info({ dir: '/runs/x/checkpoints/step-000006' }, 'checkpoint written'); check(true); }
    }
    bar.stop();
    check(false);
    const text = screen.lines.join('\n');
    assert.match(text, /WARN  data: skipped bad dataset lines  file=train.jsonl skipped=2/);
    assert.match(text, /INFO  data: checkpoint written  dir=\/runs\/x\/checkpoints\/step-000006/);
  } finally { setLogTerminal(prev); }
});

test('on a terminal a warning is coloured; as JSON (no TTY, or --log-format json) every line is a pino object with its level', () => {
  const warn = prettyLine(JSON.stringify({ level: 40, time: '2026-12-06T10:00:00.000Z', mod: 'data', msg: 'skipped bad dataset lines', skipped: 3 }), true);
  assert.ok(warn.includes('\x1b[33mWARN \x1b[0m'), warn);
  const out: string[] = [];
  const prev = setLogTerminal(new Terminal({ write: (s: string) => { out.push(s); }, isTTY: false }));
  setLogFormat('json'); rootLogger.level = 'info';
  try {
    logger('data').warn({ skipped: 3 }, 'skipped bad dataset lines');
    logger('job').info({ token: 'secret' }, 'loading');
  } finally { setLogTerminal(prev); }
  const lines = out.join('').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.deepEqual(lines.map((l) => [l.level, l.mod, l.msg]), [[40, 'data', 'skipped bad dataset lines'], [30, 'job', 'loading']]);
  assert.equal(lines[1].token, '[redacted]');
});

test('the training bar shows step, loss, lr, tokens/s and ETA; without a TTY a step line every log_every steps', () => {
  const screen = new Screen(120);
  const term = new Terminal(screen);
  const prev = setLogTerminal(term);
  setLogFormat('pretty'); rootLogger.level = 'info';
  try {
    const start = { name: 'j', outputDir: '/x', totalSteps: 4, startStep: 0, stepsPerEpoch: 4, stages: 1, replicas: 1, executor: 'in-process' as const, backend: 'cpu', trainExamples: 16, validationExamples: 2 };
    const step = (s: number) => ({ step: s, totalSteps: 4, loss: 2 / s, lr: 1e-3, gradNorm: 0.5, tokens: 1000, labelTokens: 500, epoch: s / 4, seconds: 2, tokensPerSecond: 500, bubble: 0, stageTimings: [] });
    const o = new TerminalObserver({ tty: true, terminal: term });
    o.onStart(start);
    o.onStep(step(1)); o.onStep(step(2));
    assert.match(screen.lines.at(-1)!, /^train \|[█░]+\| 2\/4 loss 1\.0000 \| lr 1\.00e-3 \| 500 tok\/s \| eta 4s$/);
    o.onRecovery({ step: 2, attempt: 1, reason: 'worker w1 (stage 1) lost: heartbeat timeout', resumeFrom: '' });
    assert.match(screen.lines.at(-2)!, /WARN  train: recovering: worker w1 \(stage 1\) lost: heartbeat timeout  step=2 attempt=1/);
    assert.match(screen.lines.at(-1)!, /^train \|/);
    o.onEnd({ status: 'succeeded', step: 4, totalSteps: 4, firstLoss: 2, lastLoss: 0.5, evalLoss: null, seconds: 8, tokensPerSecond: 500, answers: [] });
    assert.equal(screen.lines.at(-1), '');
    assert.match(screen.lines.at(-2)!, /INFO  train: job finished  status=succeeded step=4 total=4/);

    const plain = new Screen(120);
    const pt = new Terminal({ write: (s: string) => plain.write(s), isTTY: false });
    setLogTerminal(pt);
    const p = new TerminalObserver({ tty: false, logEvery: 2, terminal: pt });
    p.onStart(start);
    for (let s = 1; s <= 4; s++) p.onStep(step(s));
    const steps = plain.lines.filter((l) => / train: step /.test(l));
    assert.equal(steps.length, 2);
    assert.match(steps[1], /step=4 total=4 loss=0\.5 lr=0\.001 gradNorm=0\.5 epoch=1 tokensPerSec=500 etaSeconds=0/);
  } finally { setLogTerminal(prev); }
});

test('the bar line is cut to the terminal width, counting wide CJK characters as two cells', () => {
  assert.equal(displayWidth('拓数派#openpie'), 3 * 2 + 8);
  const cut = fitWidth('train 拓数派拓数派拓数派 detail', 12);
  assert.ok(displayWidth(cut) <= 12);
  assert.ok(cut.endsWith('…'));
});
