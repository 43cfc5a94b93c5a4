// Helpers of the deploy/ tests: metric names registered by common/metrics.ts, metric names and label matchers
// referenced by a PromQL expression, a Dockerfile reader and the .dockerignore matching rules.
import { createCoordinatorMetrics, createWorkerMetrics } from '../../common/metrics.ts';

/** Series-name suffixes a metric of each type exposes. */
const SUFFIXES: Record<string, string[]> = { histogram: ['_bucket', '_sum', '_count'], summary: ['_sum', '_count', ''] };

export interface RegisteredMetric {
  readonly base: string;
  readonly type: string;
  /** Label names the metric declares, plus the registry's default labels. */
  readonly labels: ReadonlySet<string>;
}

/** Every series name both registries expose (histogram _bucket/_sum/_count included) → its metric. */
export function registeredSeries(): Map<string, RegisteredMetric> {
  const out = new Map<string, RegisteredMetric>();
  const regs = [
    { reg: createCoordinatorMetrics({ defaultLabels: { job: 'j' } }).registry, defaults: ['job'] },
    { reg: createWorkerMetrics({ defaultLabels: { role: 'worker' } }).registry, defaults: ['role'] },
  ];
  for (const { reg, defaults } of regs) {
    for (const m of reg.getMetricsAsArray()) {
      const declared = (m as unknown as { labelNames?: readonly string[] }).labelNames ?? [];
      const type = String(m.type);
      const prev = out.get(m.name);
      const labels = new Set([...declared, ...defaults, ...(prev?.labels ?? []), ...(type === 'histogram' ? ['le'] : []), ...(type === 'summary' ? ['quantile'] : [])]);
      const entry: RegisteredMetric = { base: m.name, type, labels };
      out.set(m.name, entry);
      for (const s of SUFFIXES[type] ?? []) out.set(m.name + s, entry);
    }
  }
  return out;
}

const KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or', 'unless', 'offset', 'Inf', 'NaN', 'inf', 'nan', 'atan2']);

export interface SeriesRef {
  readonly name: string;
  /** Label names of the matchers written right after the name ({a="x", b!="y"}); empty without braces. */
  readonly labels: string[];
}

/**
 * Metric names a PromQL expression reads, each with the label names it matches on. Not a full parser: strings,
 * ranges and grouping clauses are cut out, then every identifier that is not a keyword, a function/aggregator
 * call, or part of a number/duration is a metric name. Never throws; linear in the input.
 */
export function seriesInPromql(expr: string): SeriesRef[] {
  const noStrings = expr.replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""');
  // Label matchers of each selector, replaced by a marker so the name before them can pick them up.
  const matchers: string[][] = [];
  const noBraces = noStrings.replace(/\{([^{}]*)\}/g, (_m, body: string) => {
    matchers.push([...body.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)/g)].map((x) => x[1]));
    return `\u0001${matchers.length - 1}\u0002`;
  });
  const cut = noBraces
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  const out: SeriesRef[] = [];
  const re = /(?<![\w.$\u0001])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\u0001(\d+)\u0002)?(\s*\()?/g;
  for (const m of cut.matchAll(re)) {
    const [, name, , idx, call] = m;
    if (call || KEYWORDS.has(name)) continue;
    out.push({ name, labels: idx !== undefined ? matchers[Number(idx)] : [] });
  }
  // Bare selectors ({__name__=...} or {job="x"} without a name) are not used here; they would show up as no name.
  return out;
}

export interface DockerInstruction {
  readonly op: string;
  readonly args: string;
  readonly line: number;
}

export interface DockerStage {
  readonly from: string;
  readonly name?: string;
  readonly instructions: DockerInstruction[];
}

/** Dockerfile → stages of instructions (continuation lines joined, comments dropped). Throws on an instruction before FROM (other than ARG). */
export function parseDockerfile(text: string): { args: DockerInstruction[]; stages: DockerStage[] } {
  const lines = text.split('\n');
  const instrs: DockerInstruction[] = [];
  for (let i = 0; i < lines.length; i++) {
    const start = i;
    let l = lines[i];
    if (/^\s*(#|$)/.test(l)) continue;
    while (l.trimEnd().endsWith('\\') && i + 1 < lines.length) {
      l = l.trimEnd().slice(0, -1) + ' ' + lines[++i].trim();
    }
    const m = /^\s*([A-Za-z]+)\s+(.*)$/.exec(l);
    if (!m) throw new Error(`Dockerfile line ${start + 1}: cannot read "${l}"`);
    instrs.push({ op: m[1].toUpperCase(), args: m[2].trim(), line: start + 1 });
  }
  const args: DockerInstruction[] = [];
  const stages: DockerStage[] = [];
  for (const ins of instrs) {
    if (ins.op === 'FROM') {
      const m = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args);
      if (!m) throw new Error(`Dockerfile line ${ins.line}: bad FROM "${ins.args}"`);
      stages.push({ from: m[1], name: m[2], instructions: [] });
    } else if (stages.length === 0) {
      if (ins.op !== 'ARG') throw new Error(`Dockerfile line ${ins.line}: ${ins.op} before the first FROM`);
      args.push(ins);
    } else {
      stages[stages.length - 1].instructions.push(ins);
    }
  }
  return { args, stages };
}

/** A COPY's flags, sources and destination (shell form only, which is all our Dockerfiles use). */
export function parseCopy(args: string): { from?: string; sources: string[]; dest: string } {
  const words = args.split(/\s+/).filter(Boolean);
  let from: string | undefined;
  while (words[0]?.startsWith('--')) {
    const w = words.shift()!;
    if (w.startsWith('--from=')) from = w.slice('--from='.length);
  }
  if (words.length < 2) throw new Error(`COPY needs a source and a destination: "${args}"`);
  const dest = words.pop()!;
  return { from, sources: words, dest };
}

/** Docker's .dockerignore semantics: patterns in order, the last one matching a path (or a parent of it) wins; `!` re-includes. */
export function dockerignored(patterns: string[], path: string): boolean {
  const rules = patterns.map((p) => p.trim()).filter((p) => p && !p.startsWith('#')).map((p) => {
    const neg = p.startsWith('!');
    const body = (neg ? p.slice(1) : p).replace(/^\/+|\/+$/g, '');
    const re = new RegExp('^' + body.split('/').map((seg) => seg === '**' ? '(?:.*)' : seg.replace(/[.+^${}()|\\]/g, '\\$&').replace(/\*/g, '[^/]*').replace(/\?/g, '[^/]')).join('/').replace(/\(\?:\.\*\)\//g, '(?:.*/)?') + '$');
    return { neg, re };
  });
  const parts = path.split('/');
  let ignored = false;
  for (const r of rules) {
    for (let i = 1; i <= parts.length; i++) {
      if (r.re.test(parts.slice(0, i).join('/'))) { ignored = !r.neg; break; }
    }
  }
  return ignored;
}
