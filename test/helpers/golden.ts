// The batch format of the golden fixtures (expected.json written by test/reference/*.py): right-padded input ids,
// attention mask and labels → the stage's micro-batch (targets shifted by one, HF's default position ids).
import type { StageBatch } from '../../core/model/llama.ts';

export interface GoldenBatch { input_ids: number[][]; attention_mask: number[][]; labels: number[][] }

export function goldenBatch(g: GoldenBatch): StageBatch {
  const B = g.input_ids.length, T = g.input_ids[0].length;
  const ids = new Int32Array(B * T), keyMask = new Int32Array(B * T), positions = new Int32Array(B * T), targets = new Int32Array(B * T).fill(-100);
  for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) {
    ids[b * T + t] = g.input_ids[b][t];
    keyMask[b * T + t] = g.attention_mask[b][t];
    positions[b * T + t] = t; // HF default position ids (right padding)
    if (t + 1 < T) targets[b * T + t] = g.labels[b][t + 1];
  }
  return { B, T, ids, keyMask, positions, targets, sampleIds: Int32Array.from({ length: B }, (_, i) => i) };
}
