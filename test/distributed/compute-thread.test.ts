// The worker's compute thread (worker/runtime/compute.ts) gives back every byte a stage held when the stage is
// released or re-assigned: a recovery re-assigns the stages of the surviving workers, and on a GPU the old stage's
// weights, LoRA state and whatever a failed step left would otherwise stay on the device beside the new one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { ComputeThread } from '../../worker/runtime/stage-compute.ts';
import { parseJob, loraConfigOf } from '../../coordinator/job.ts';
import { stageSettings } from '../../coordinator/features.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { makeMicroBatch } from '../../core/train/batch.ts';
import { dropoutKey, lossScale } from '../../core/train/step.ts';
import type { Assignment } from '../../wire/assignment.ts';

const FIX = join(import.meta.dirname, '..', 'fixtures', 'golden', 'llama-gqa', 'model');

function assignment(): Assignment {
  const job = parseJob({ model: FIX, output_dir: '/tmp/o', data: { train: 't' }, lora: { r: 4, alpha: 8, dropout: 0.1 } }, 'job.yaml', '/tmp');
  return {
    jobId: 'j', generation: 1, stage: 0, numStages: 1, replica: 0, numReplicas: 1, spec: { firstLayer: 0, lastLayer: 1, hasEmbedding: true, hasHead: true },
    modelDir: FIX, natsUrl: '', prev: '', next: '', resumeFrom: '', firstSeq: 1,
    ...stageSettings(job, loraConfigOf(job, loadModelConfig(FIX)), { stepTimeoutMs: 10_000, chunkBytes: 1 << 20 }),
  };
}

test('release and re-assign give back everything the stage held, also after a step that stopped half way', async () => {
  const { thread } = await ComputeThread.start('cpu');
  try {
    const base = thread.memoryInUse;
    const a = assignment();
    await thread.call({ op: 'assign', a });
    const loaded = thread.memoryInUse;
    assert.ok(loaded > base, `the stage holds memory (${loaded} B)`);
    // a forward whose backward never comes (as when a step is aborted or runs out of memory), then an update that
    // creates the optimizer moments
    const ids = Int32Array.from({ length: 12 }, (_, i) => 3 + i);
    const mb = makeMicroBatch([{ inputIds: ids, labels: ids, sourceIndex: 0 }], { padId: 0, sampleIds: [0] });
    await thread.call({ op: 'forward', id: 0, batch: mb, train: true, dropout: dropoutKey(1, 0), gradScale: lossScale(mb.labelCount) });
    await thread.call({ op: 'update', step: 0, lr: 1e-3, clipCoef: 1 });
    assert.ok(thread.memoryInUse > loaded, 'saved activations and moments are held');
    await thread.call({ op: 'assign', a });           // a recovery's re-assign
    assert.equal(thread.memoryInUse, loaded, 're-assigning kept the old stage\'s memory');
    await thread.call({ op: 'release' });
    assert.equal(thread.memoryInUse, base, 'releasing kept memory');
  } finally {
    await thread.close();
  }
});
