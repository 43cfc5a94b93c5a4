// The layout is the architecture: every import arrow points down.
//
//   coordinator/   worker/        (side by side: never import each other)
//          \        /
//        wire/  core/             (wire may use core's domain types; core never imports wire)
//           \    /
//          common/   proto/gen/
//
// Parses the relative imports of every .ts file (static, dynamic and `export … from`) and fails on an upward or
// sideways arrow and on any import cycle among the non-test files.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';

const root = path.resolve(import.meta.dirname, '..');
const SKIP = new Set(['node_modules', '.git', 'examples-cache', 'runs', '.device', 'build']);

function tsFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    if (SKIP.has(e.name)) continue;
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...tsFiles(p));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(path.relative(root, p));
  }
  return out;
}

const IMPORT = /(?:^|\n)\s*(?:import|export)\b[^'"]*?\bfrom\s*['"](\.{1,2}\/[^'"]+)['"]|import\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)|(?:^|\n)\s*import\s+['"](\.{1,2}\/[^'"]+)['"]/g;

function importsOf(file: string): string[] {
  const src = fs.readFileSync(path.join(root, file), 'utf8');
  const out: string[] = [];
  for (const m of src.matchAll(IMPORT)) {
    const spec = m[1] ?? m[2] ?? m[3];
    const target = path.normalize(path.join(path.dirname(file), spec));
    out.push(target.endsWith('.ts') ? target : `${target}.ts`);
  }
  return out;
}

const files = tsFiles(root);
const graph = new Map(files.map((f) => [f, importsOf(f)]));
const layer = (f: string): string => f.split(path.sep)[0];
/** Which top-level folders each layer may import (besides itself). */
const ALLOWED: Record<string, readonly string[]> = {
  coordinator: ['core', 'wire', 'common', 'proto'],
  worker: ['core', 'wire', 'common', 'proto'],
  wire: ['core', 'common', 'proto'],
  core: ['common', 'proto'],
  common: ['proto'],
  proto: [],
};

test('the import parser sees static, dynamic and re-export imports', () => {
  const run = graph.get(path.join('coordinator', 'run.ts'))!;
  assert.ok(run.includes(path.join('core', 'train', 'steps.ts')), 'coordinator/run.ts imports core/train/steps.ts');
  const answer = graph.get(path.join('coordinator', 'answer.ts'))!;
  assert.ok(answer.includes(path.join('core', 'engine', 'index.ts')), 'a dynamic import() is seen');
  assert.ok(graph.get(path.join('coordinator', 'data', 'tokenize.ts'))!.includes(path.join('coordinator', 'data', 'format.ts')));
});

test('every import of the product code points down: coordinator/ and worker/ never import each other', () => {
  const bad: string[] = [];
  for (const [f, deps] of graph) {
    const from = layer(f);
    if (!(from in ALLOWED)) continue; // test/, bench/, deploy/, scripts/ may use anything
    for (const d of deps) {
      const to = layer(d);
      if (to !== from && !ALLOWED[from].includes(to)) bad.push(`${f} -> ${d}`);
    }
  }
  assert.deepEqual(bad, [], `upward or sideways imports:\n${bad.join('\n')}`);
});

test('no import cycles among the product files', () => {
  const nodes = files.filter((f) => layer(f) in ALLOWED && !f.startsWith(path.join('proto', 'gen')));
  const inProduct = new Set(nodes);
  // Tarjan's strongly connected components; a component of more than one file is a cycle.
  let index = 0;
  const idx = new Map<string, number>(), low = new Map<string, number>(), onStack = new Set<string>(), stack: string[] = [];
  const cycles: string[][] = [];
  const visit = (v: string): void => {
    idx.set(v, index); low.set(v, index); index++; stack.push(v); onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!inProduct.has(w)) continue;
      if (!idx.has(w)) { visit(w); low.set(v, Math.min(low.get(v)!, low.get(w)!)); } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, idx.get(w)!));
    }
    if (low.get(v) === idx.get(v)) {
      const c: string[] = [];
      let w: string;
      do { w = stack.pop()!; onStack.delete(w); c.push(w); } while (w !== v);
      if (c.length > 1) cycles.push(c.sort());
    }
  };
  for (const v of nodes) if (!idx.has(v)) visit(v);
  assert.deepEqual(cycles, [], `import cycles:\n${cycles.map((c) => c.join(' <-> ')).join('\n')}`);
});

test('the step math is written once: the dropout stream and the clip rule live only in core/train/step.ts', () => {
  const product = files.filter((f) => layer(f) in ALLOWED);
  const where = (re: RegExp): string[] => product.filter((f) => re.test(fs.readFileSync(path.join(root, f), 'utf8')));
  assert.deepEqual(where(/0x44524f50/), [path.join('core', 'train', 'step.ts')]);
  assert.deepEqual(where(/\+ 1e-6\)/), [path.join('core', 'train', 'step.ts')]);
  assert.deepEqual(where(/\bbe\.adamw\(/), [path.join('core', 'train', 'step.ts')]);
});
