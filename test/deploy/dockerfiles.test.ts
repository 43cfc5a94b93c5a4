// deploy/docker: no Docker engine here, so the Dockerfiles are checked by reading them: every COPY source exists
// and passes the .dockerignore, `npm ci` gets everything package.json's install script compiles, the runtime
// stages carry every file the entry points import (and only production dependencies), run as non-root, and
// start the bin/ scripts package.json names. The images the manifests reference are the targets built here.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { dockerignored, parseCopy, parseDockerfile, type DockerStage } from './helpers.ts';
import { CPU_NATIVE_PATH } from '../../core/engine/cpu/native.ts';
import { ADDON_PATH as CUDA_ADDON_PATH } from '../../core/engine/cuda/native.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const dockerDir = path.join(root, 'deploy', 'docker');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string>; bin: Record<string, string>; dependencies: Record<string, string> };
const rel = (p: string) => path.relative(root, p).split(path.sep).join('/');

const files = {
  cpu: { df: parseDockerfile(fs.readFileSync(path.join(dockerDir, 'Dockerfile.cpu'), 'utf8')), ignore: fs.readFileSync(path.join(dockerDir, 'Dockerfile.cpu.dockerignore'), 'utf8').split('\n') },
  cuda: { df: parseDockerfile(fs.readFileSync(path.join(dockerDir, 'Dockerfile.cuda'), 'utf8')), ignore: fs.readFileSync(path.join(dockerDir, 'Dockerfile.cuda.dockerignore'), 'utf8').split('\n') },
};
const stage = (st: DockerStage[], name: string): DockerStage => {
  const s = st.find((x) => x.name === name);
  assert.ok(s, `stage ${name} exists`);
  return s;
};
const ops = (s: DockerStage, op: string) => s.instructions.filter((i) => i.op === op);
const argDefault = (df: ReturnType<typeof parseDockerfile>, name: string) => df.args.find((a) => a.args.startsWith(`${name}=`))?.args.split('=')[1];

/** Context paths a stage copies from the build context (no --from), as relative paths. */
const contextCopies = (s: DockerStage) => ops(s, 'COPY').map((i) => parseCopy(i.args)).filter((c) => !c.from).flatMap((c) => c.sources);
/** Copied path covers p (the path itself or a directory above it). */
const covers = (copies: string[], p: string) => copies.some((c) => p === c || p.startsWith(c.replace(/\/$/, '') + '/'));

/** Files reachable from an entry point through relative imports, and the bare packages they import at run time. */
function importGraph(entries: string[]): { files: Set<string>; packages: Set<string> } {
  const seen = new Set<string>();
  const packages = new Set<string>();
  const todo = [...entries];
  while (todo.length) {
    const f = todo.pop()!;
    if (seen.has(f)) continue;
    seen.add(f);
    const text = fs.readFileSync(path.join(root, f), 'utf8');
    for (const m of text.matchAll(/^\s*(import|export)\s+(type\s+)?(?:[^'"]*?\sfrom\s+)?['"]([^'"]+)['"]|\bimport\(\s*['"]([^'"]+)['"]\s*\)/gm)) {
      const spec = m[3] ?? m[4];
      const typeOnly = Boolean(m[2]);
      if (spec.startsWith('.')) {
        let target = rel(path.resolve(path.join(root, path.dirname(f)), spec));
        // ts-proto output imports './x.js'; tsx resolves it to x.ts.
        if (!fs.existsSync(path.join(root, target)) && target.endsWith('.js')) target = target.slice(0, -3) + '.ts';
        assert.ok(fs.existsSync(path.join(root, target)), `${f} imports ${spec}, which exists`);
        todo.push(target);
      } else if (!spec.startsWith('node:') && !typeOnly) {
        packages.add(spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]);
      }
    }
  }
  return { files: seen, packages };
}

test('the two .dockerignore files are identical allow-lists that keep secrets, git, tests and build outputs out', () => {
  assert.deepEqual(files.cuda.ignore, files.cpu.ignore);
  const ig = files.cpu.ignore;
  for (const p of ['.git/config', 'node_modules/tsx/package.json', 'test/deploy/helpers.ts', 'bench/RESULTS.md', 'deploy/k8s/base/secrets.env', 'examples-cache/x',
    'core/engine/cpu-native/build/dqlora_cpu.node', 'core/engine/cuda/build/obj/a.o', 'worker/node_modules/x', 'coordinator/run.log', '.env']) {
    assert.ok(dockerignored(ig, p), `${p} is left out of the context`);
  }
  for (const p of ['package.json', 'package-lock.json', 'tsconfig.json', 'scripts/build-native.mjs', 'bin/worker.js', 'core/engine/cpu-native/src/addon.cc', 'core/engine/cuda/build.mjs', 'proto/gen/dqlora/v1/control.ts']) {
    assert.ok(!dockerignored(ig, p), `${p} is in the context`);
  }
});

test('every COPY source exists in the repository and passes the .dockerignore; --from stages exist', () => {
  for (const [flavour, { df, ignore }] of Object.entries(files)) {
    const stageNames = new Set<string>();
    let copies = 0;
    for (const st of df.stages) {
      for (const ins of ops(st, 'COPY')) {
        const c = parseCopy(ins.args);
        if (c.from) {
          assert.ok(stageNames.has(c.from), `${flavour}:${ins.line}: COPY --from=${c.from} names an earlier stage`);
          continue;
        }
        for (const s of c.sources) {
          copies++;
          assert.ok(fs.existsSync(path.join(root, s)), `${flavour}:${ins.line}: COPY source ${s} exists`);
          assert.ok(!dockerignored(ignore, s), `${flavour}:${ins.line}: COPY source ${s} is not ignored`);
        }
      }
      if (st.name) stageNames.add(st.name);
    }
    assert.ok(copies >= 10, `${flavour}: ${copies} context copies checked`);
  }
});

test('build stages: compilers installed, and `npm ci` sees every file package.json\'s install script builds', () => {
  const install = pkg.scripts.install;
  assert.equal(install, 'node scripts/build-native.mjs', 'package.json install script (the Dockerfiles copy exactly this)');
  const buildNative = fs.readFileSync(path.join(root, 'scripts', 'build-native.mjs'), 'utf8');
  const addons = [...buildNative.matchAll(/'(core\/engine\/[\w-]+)'/g)].map((m) => m[1]);
  assert.deepEqual(addons, ['core/engine/cpu-native', 'core/engine/cuda']);
  const want = { cpu: ['core/engine/cpu-native'], cuda: ['core/engine/cpu-native', 'core/engine/cuda'] };
  for (const [flavour, { df }] of Object.entries(files) as [keyof typeof files, (typeof files)['cpu']][]) {
    const build = stage(df.stages, 'build');
    const run = ops(build, 'RUN').map((i) => i.args).join('\n');
    for (const tool of ['g++', 'make', 'python3']) assert.match(run, new RegExp(`install[^\\n]*\\s${tool.replace('+', '\\+')}(\\s|$)`), `${flavour}: build stage installs ${tool}`);
    const ciAt = build.instructions.findIndex((i) => i.op === 'RUN' && /\bnpm ci\b/.test(i.args));
    assert.ok(ciAt >= 0, `${flavour}: build stage runs npm ci`);
    assert.match(build.instructions[ciAt].args, /npm ci --omit=dev/);
    const before = contextCopies({ ...build, instructions: build.instructions.slice(0, ciAt) });
    for (const p of ['package.json', 'package-lock.json', 'scripts/build-native.mjs']) assert.ok(covers(before, p) || before.includes('./') , `${flavour}: ${p} copied before npm ci`);
    for (const a of want[flavour]) {
      assert.ok(covers(before, `${a}/build.mjs`), `${flavour}: ${a}/build.mjs copied before npm ci`);
      for (const src of fs.readdirSync(path.join(root, a, 'src'))) assert.ok(covers(before, `${a}/src/${src}`), `${flavour}: ${a}/src/${src} copied before npm ci`);
      // The addon the build must produce is where the backend loads it from.
      const built = rel(a.endsWith('cuda') ? CUDA_ADDON_PATH : CPU_NATIVE_PATH);
      assert.match(build.instructions[ciAt].args, new RegExp(`test -f ${built.replace(/\./g, '\\.')}`), `${flavour}: the build checks ${built} was produced`);
    }
  }
  // The images' Node satisfies `engines` (itself the highest any production dependency declares: @nats-io/nuid ≥ 22).
  const engines = (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { engines: { node: string } }).engines.node;
  const needMajor = Number(/^>=\s*(\d+)/.exec(engines)?.[1]);
  assert.ok(needMajor >= 22, `engines.node ${engines} covers @nats-io/nuid's >= 22`);
  for (const f of ['cpu', 'cuda'] as const) {
    const img = argDefault(files[f].df, 'NODE_IMAGE') ?? '';
    assert.match(img, /^node:\d+-bookworm-slim$/);
    assert.ok(Number(/^node:(\d+)/.exec(img)![1]) >= needMajor, `${f}: ${img} satisfies engines ${engines}`);
    assert.match(fs.readFileSync(path.join(dockerDir, `Dockerfile.${f}`), 'utf8'), /DQLORA_CACHE_DIR=\/tmp\//, `${f}: the example cache goes to a writable path`);
  }
  assert.match(argDefault(files.cuda.df, 'CUDA_VERSION') ?? '', /^13\.\d+\.\d+$/);
  assert.equal(stage(files.cuda.df.stages, 'build').from, 'nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04');
});

test('runtime stages carry every file the entry points import, only production packages, the built addons, as non-root', () => {
  const targets = [
    { flavour: 'cpu' as const, name: 'coordinator', entry: 'bin/coordinator.js', addons: [CPU_NATIVE_PATH] },
    { flavour: 'cpu' as const, name: 'worker', entry: 'bin/worker.js', addons: [CPU_NATIVE_PATH] },
    { flavour: 'cuda' as const, name: 'worker', entry: 'bin/worker.js', addons: [CPU_NATIVE_PATH, CUDA_ADDON_PATH] },
  ];
  for (const t of targets) {
    const { df, ignore } = files[t.flavour];
    const target = stage(df.stages, t.name);
    // The target's chain of stages (FROM runtime AS worker → runtime).
    const chain: DockerStage[] = [target];
    while (df.stages.some((s) => s.name === chain[chain.length - 1].from)) chain.push(stage(df.stages, chain[chain.length - 1].from));
    const all = chain.flatMap((s) => s.instructions);
    const where = `${t.flavour}/${t.name}`;
    assert.ok(t.flavour !== 'cuda' || chain[chain.length - 1].from === 'nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04', `${where}: CUDA runtime image (cuBLAS)`);

    const entrypoint = JSON.parse(all.filter((i) => i.op === 'ENTRYPOINT').at(-1)!.args) as string[];
    assert.deepEqual(entrypoint.slice(-2), ['node', t.entry], `${where}: entrypoint`);
    assert.equal(entrypoint[0], 'tini', `${where}: tini forwards SIGTERM`);
    assert.ok(Object.values(pkg.bin).includes(t.entry), `${where}: ${t.entry} is a package.json bin`);
    const user = all.filter((i) => i.op === 'USER').at(-1)?.args;
    assert.ok(user && !/^(0|root)(:|$)/.test(user), `${where}: runs as a non-root user (${user})`);
    assert.equal(user, '1000:1000', `${where}: the uid the manifests run as`);

    const copies = chain.flatMap((s) => ops(s, 'COPY').map((i) => parseCopy(i.args)));
    const fromContext = copies.filter((c) => !c.from).flatMap((c) => c.sources);
    const fromBuild = copies.filter((c) => c.from === 'build').flatMap((c) => c.sources.map((s) => s.replace(/^\/app\//, '')));
    const { files: reached, packages } = importGraph([t.entry]);
    assert.ok(reached.size > 30, `${where}: ${reached.size} source files reached`);
    for (const f of reached) {
      assert.ok(covers(fromContext, f), `${where}: ${f} (imported at run time) is copied into the image`);
      assert.ok(!dockerignored(ignore, f), `${where}: ${f} is not ignored`);
    }
    for (const p of packages) assert.ok(p in pkg.dependencies, `${where}: ${p} is imported at run time, so it must be a production dependency (npm ci --omit=dev)`);
    assert.ok(fromBuild.includes('node_modules'), `${where}: node_modules from the build stage`);
    for (const a of t.addons) assert.ok(fromBuild.includes(rel(a)), `${where}: ${rel(a)} from the build stage`);
    assert.ok(covers(fromContext, 'tsconfig.json') && covers(fromContext, 'package.json'), `${where}: package.json and tsconfig.json (tsx reads them)`);
  }
});

test('the images the manifests run are the targets these Dockerfiles build', async () => {
  const { buildK8s } = await import('../../deploy/gen/k8s.ts');
  const { defaultDeployConfig: cfg } = await import('../../deploy/gen/config.ts');
  const images = new Set<string>();
  for (const objs of buildK8s(cfg).rendered.values()) {
    for (const o of objs) {
      const cts = ((o.spec as { template?: { spec?: { containers?: { image: string }[] } } } | undefined)?.template?.spec?.containers) ?? [];
      for (const c of cts) images.add(c.image);
    }
  }
  const ours = [...images].filter((i) => i.startsWith(cfg.registry)).sort();
  assert.deepEqual(ours, [`${cfg.registry}/coordinator:${cfg.tag}-cpu`, `${cfg.registry}/worker:${cfg.tag}-cpu`, `${cfg.registry}/worker:${cfg.tag}-cuda`]);
  // The README's build commands name the same targets and tags.
  const readme = fs.readFileSync(path.join(root, 'deploy', 'README.md'), 'utf8');
  assert.match(readme, /Dockerfile\.cpu --target coordinator -t \$REGISTRY\/coordinator:\$TAG-cpu/);
  assert.match(readme, /Dockerfile\.cpu --target worker -t \$REGISTRY\/worker:\$TAG-cpu/);
  assert.match(readme, /Dockerfile\.cuda -t \$REGISTRY\/worker:\$TAG-cuda/);
});

test('fuzz: the Dockerfile and COPY readers reject mangled input with an error naming the line, never hang', () => {
  const text = fs.readFileSync(path.join(dockerDir, 'Dockerfile.cpu'), 'utf8');
  let seed = 12345;
  const rnd = (n: number) => { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; return seed % n; };
  const junk = ' \\\n#FROMAS=:-{}"[]\tCOPY';
  let parsed = 0, rejected = 0;
  for (let i = 0; i < 1500; i++) {
    const chars = text.split('');
    for (let k = rnd(8); k >= 0; k--) chars.splice(rnd(chars.length + 1), rnd(4), junk[rnd(junk.length)]);
    try {
      const df = parseDockerfile(chars.join(''));
      for (const st of df.stages) for (const ins of ops(st, 'COPY')) { try { parseCopy(ins.args); } catch (e) { assert.match((e as Error).message, /COPY needs/); } }
      parsed++;
    } catch (e) {
      assert.match((e as Error).message, /^Dockerfile line \d+: /);
      rejected++;
    }
  }
  assert.equal(parsed + rejected, 1500);
  assert.ok(parsed > 0);
});
