// The README's configuration reference is generated (`npx coordinator config-doc`, from the descriptions in
// coordinator/job.ts): the committed table must be exactly what the schema prints, so a field's documentation cannot
// drift from the code that parses it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { configReference } from '../../coordinator/job.ts';

test('README.md "Configuration" table = `coordinator config-doc` output (regenerate the table after editing a field\'s description)', () => {
  const readme = readFileSync(join(import.meta.dirname, '..', '..', 'README.md'), 'utf8');
  const start = readme.indexOf('| field | default | description |');
  assert.ok(start >= 0, 'README.md has the configuration table');
  const end = readme.indexOf('\n\n', start);
  const table = readme.slice(start, end < 0 ? undefined : end);
  const want = configReference();
  if (table !== want) {
    const a = table.split('\n'), b = want.split('\n');
    const i = a.findIndex((l, k) => l !== b[k]);
    assert.fail(`README.md's configuration table differs from \`npx coordinator config-doc\` at row ${i}:\n  README:    ${a[i] ?? '(missing)'}\n  generated: ${b[i] ?? '(missing)'}\nreplace the table with the command's output`);
  }
});
