// The attention mask rule shared by the attention kernels (v1 attention.cu, v2 attention2.cu) and the CPU kernels
// (core/engine/cpu/attention-ts.ts `visible`, cpu-native kernels.h maskRowMax): keyMask values are 0 for padding and
// otherwise the segment (packed example) a token belongs to. A real query sees, among keys at or before it, the real
// keys of its own segment only — the block-diagonal causal mask of sample packing; a padding query sees every real
// key (what it computes is never used). Unpacked batches label every real token 1, so this is the plain causal +
// key-padding mask there.
#pragma once

namespace dq {
__device__ __forceinline__ bool attnVisible(int keySeg, int querySeg) {
  return keySeg != 0 && (querySeg == 0 || keySeg == querySeg);
}
}  // namespace dq
