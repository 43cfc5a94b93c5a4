// The local launcher spreads workers over GPUs: one CUDA_VISIBLE_DEVICES entry per worker slot, round-robin.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { localGpus } from '../../coordinator/distributed/local.ts';

test('local GPUs come from CUDA_VISIBLE_DEVICES when it is set (hidden and empty entries dropped)', () => {
  assert.deepEqual(localGpus({ CUDA_VISIBLE_DEVICES: '0,1, 3' }), ['0', '1', '3']);
  assert.deepEqual(localGpus({ CUDA_VISIBLE_DEVICES: '-1' }), []);
  assert.deepEqual(localGpus({ CUDA_VISIBLE_DEVICES: 'GPU-5f1c,GPU-77aa' }), ['GPU-5f1c', 'GPU-77aa']);
});

test('without CUDA_VISIBLE_DEVICES the list comes from nvidia-smi, and is empty where there is none', () => {
  const gpus = localGpus({ PATH: process.env.PATH });
  assert.ok(Array.isArray(gpus) && gpus.every((g) => /^\d+$/.test(g)));
});
