// output_dir/loss.svg, written at the end of a run: the training loss per step (a line) and the evaluation loss
// (a line with markers) on one step axis, with ticks and a legend — a plain SVG that any browser or image viewer
// shows, no chart library. A resumed run's plot includes the steps before the resume, read from train_log.jsonl.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { EvalEvent, JobEndEvent, JobObserver, JobStartEvent, StepEvent } from '../events.ts';
import { readTrainLog, TRAIN_LOG } from './train-log.ts';

export const LOSS_PLOT = 'loss.svg';

export interface Point { readonly step: number; readonly loss: number }

/** "Nice" tick values (1, 2, 5 × 10^k) covering [lo, hi], about `n` of them. */
export function niceTicks(lo: number, hi: number, n = 5): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw)!;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

const esc = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/** The SVG text. Points are drawn in step order; non-finite losses are left out (a gap, not a spike). */
export function renderLossSvg(train: readonly Point[], evals: readonly Point[], title: string, size = { width: 720, height: 400 }): string {
  const W = size.width, H = size.height, L = 64, R = 16, T = 36, B = 44;
  const tr = train.filter((p) => Number.isFinite(p.loss)).slice().sort((a, b) => a.step - b.step);
  const ev = evals.filter((p) => Number.isFinite(p.loss)).slice().sort((a, b) => a.step - b.step);
  const all = [...tr, ...ev];
  const head = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">\n<rect width="${W}" height="${H}" fill="#fff"/>\n<text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${esc(title)}</text>\n`;
  if (all.length === 0) return `${head}<text x="${W / 2}" y="${H / 2}" text-anchor="middle">no loss recorded</text>\n</svg>\n`;
  let x0 = Math.min(...all.map((p) => p.step)), x1 = Math.max(...all.map((p) => p.step));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...all.map((p) => p.loss)), y1 = Math.max(...all.map((p) => p.loss));
  const pad = (y1 - y0 || Math.abs(y1) || 1) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (v: number): number => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const sy = (v: number): number => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const f = (v: number): string => v.toFixed(2);
  const parts: string[] = [head];
  parts.push(`<g stroke="#e5e7eb">`);
  const yt = niceTicks(y0, y1), xt = niceTicks(x0, x1).filter((v) => Number.isInteger(v));
  for (const v of yt) parts.push(`<line x1="${L}" x2="${W - R}" y1="${f(sy(v))}" y2="${f(sy(v))}"/>`);
  for (const v of xt) parts.push(`<line x1="${f(sx(v))}" x2="${f(sx(v))}" y1="${T}" y2="${H - B}"/>`);
  parts.push(`</g>\n<g fill="#374151">`);
  for (const v of yt) parts.push(`<text class="ytick" x="${L - 6}" y="${f(sy(v) + 4)}" text-anchor="end">${+v.toPrecision(4)}</text>`);
  for (const v of xt) parts.push(`<text class="xtick" x="${f(sx(v))}" y="${H - B + 16}" text-anchor="middle">${v}</text>`);
  parts.push(`<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">step</text>`);
  parts.push(`<text transform="translate(14 ${(T + H - B) / 2}) rotate(-90)" text-anchor="middle">loss</text></g>`);
  parts.push(`<rect x="${L}" y="${T}" width="${W - L - R}" height="${H - T - B}" fill="none" stroke="#9ca3af"/>`);
  const line = (pts: Point[]): string => pts.map((p, i) => `${i ? 'L' : 'M'}${f(sx(p.step))},${f(sy(p.loss))}`).join(' ');
  if (tr.length) parts.push(`<path id="train-loss" d="${line(tr)}" fill="none" stroke="#3b82f6" stroke-width="1.5"><title>train loss</title></path>`);
  if (ev.length) {
    parts.push(`<path id="eval-loss" d="${line(ev)}" fill="none" stroke="#ef4444" stroke-width="2"><title>eval loss</title></path>`);
    for (const p of ev) parts.push(`<circle class="eval-point" cx="${f(sx(p.step))}" cy="${f(sy(p.loss))}" r="3.5" fill="#ef4444"><title>step ${p.step}: eval loss ${p.loss}</title></circle>`);
  }
  const lx = W - R - 130;
  parts.push(`<g><rect x="${lx}" y="${T + 6}" width="122" height="${ev.length ? 40 : 22}" fill="#fff" stroke="#d1d5db"/>`);
  parts.push(`<line x1="${lx + 8}" x2="${lx + 28}" y1="${T + 17}" y2="${T + 17}" stroke="#3b82f6" stroke-width="2"/><text x="${lx + 34}" y="${T + 21}">train loss</text>`);
  if (ev.length) parts.push(`<line x1="${lx + 8}" x2="${lx + 28}" y1="${T + 35}" y2="${T + 35}" stroke="#ef4444" stroke-width="2"/><text x="${lx + 34}" y="${T + 39}">eval loss</text>`);
  parts.push('</g>\n</svg>\n');
  return parts.join('\n');
}

export class LossPlotObserver implements JobObserver {
  private dir = '';
  private name = 'job';
  private train: Point[] = [];
  private evals: Point[] = [];

  onStart(e: JobStartEvent): void {
    this.dir = e.outputDir; this.name = e.name;
    if (e.startStep > 0) {
      const prior = readTrainLog(join(e.outputDir, TRAIN_LOG)).filter((x) => x.step <= e.startStep);
      this.train = prior.filter((x) => x.loss !== undefined).map((x) => ({ step: x.step, loss: x.loss! }));
      this.evals = prior.filter((x) => x.eval_loss !== undefined).map((x) => ({ step: x.step, loss: x.eval_loss! }));
    }
  }

  onStep(e: StepEvent): void {
    while (this.train.length && this.train[this.train.length - 1].step >= e.step) this.train.pop(); // rolled back
    this.train.push({ step: e.step, loss: e.loss });
  }

  onEval(e: EvalEvent): void {
    while (this.evals.length && this.evals[this.evals.length - 1].step >= e.step) this.evals.pop();
    this.evals.push({ step: e.step, loss: e.loss });
  }

  onEnd(e: JobEndEvent): void {
    if (!this.dir) return;
    mkdirSync(this.dir, { recursive: true });
    writeFileSync(join(this.dir, LOSS_PLOT), renderLossSvg(this.train, this.evals, `${this.name}: loss (${e.status} at step ${e.step}/${e.totalSteps})`));
  }
}
