// The job files shipped in examples/ stay valid against the schema (they are documentation users copy).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { loadJob } from '../../coordinator/job.ts';

const dir = join(import.meta.dirname, '..', '..', 'examples');

test('every examples/*.yaml is a valid job config', () => {
  const files = readdirSync(dir).filter((f) => f.endsWith('.yaml'));
  assert.ok(files.length >= 2);
  for (const f of files) {
    const job = loadJob(join(dir, f));
    assert.ok(job.model.length > 0 && job.data.train.length > 0, f);
  }
});
