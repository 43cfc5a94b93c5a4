// Writes the generated deployment files (deploy/k8s/**, deploy/prometheus/alerts.yml,
// deploy/grafana/dqlora-dashboard.json) from deploy/gen/*.ts and deploy/grafana/dashboard.ts.
//
//   node --import tsx scripts/gen-deploy.ts              write into deploy/
//   node --import tsx scripts/gen-deploy.ts --out DIR    write into DIR instead
//   node --import tsx scripts/gen-deploy.ts --check      exit 1 (listing the files) when deploy/ differs
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { generateDeploy } from '../deploy/gen/index.ts';

const deployDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'deploy');
const args = process.argv.slice(2);
const outIdx = args.indexOf('--out');
const outDir = outIdx >= 0 ? args[outIdx + 1] : deployDir;
if (outIdx >= 0 && !outDir) { process.stderr.write('error: --out needs a directory\n'); process.exit(2); }
const files = generateDeploy();

if (args.includes('--check')) {
  const stale = [...files].filter(([p, text]) => !existsSync(join(outDir, p)) || readFileSync(join(outDir, p), 'utf8') !== text).map(([p]) => p);
  if (stale.length) {
    process.stderr.write(`deploy/ is out of date with deploy/gen (run: node --import tsx scripts/gen-deploy.ts):\n${stale.map((p) => `  ${p}`).join('\n')}\n`);
    process.exit(1);
  }
  process.stdout.write(`deploy/: ${files.size} generated files up to date\n`);
} else {
  for (const [p, text] of files) {
    mkdirSync(dirname(join(outDir, p)), { recursive: true });
    writeFileSync(join(outDir, p), text);
  }
  process.stdout.write(`wrote ${files.size} files under ${outDir}\n`);
}
