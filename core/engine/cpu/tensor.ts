// Host storage for the cpu backend: a CpuTensor is a typed array (float32 for every float dtype, 'act' = 'f32')
// plus a shape. Tensors made by reshape/rows share one Storage; the Storage holds the byte count that
// memoryInUse() reports and the "freed" flag that turns any later use into a BackendError.

import type { DType, Tensor } from '../backend.ts';
import { BackendError } from '../../../common/errors.ts';

export type CpuData = Float32Array | Int32Array | Uint8Array;

/** One allocation. Views (reshape, rows) point at the same Storage, so freeing it kills them all. */
export class Storage {
  freed = false;
  constructor(readonly bytes: number) {}
}

export class CpuTensor implements Tensor {
  readonly size: number;
  constructor(
    private readonly _data: CpuData,
    readonly shape: readonly number[],
    readonly dtype: DType,
    readonly storage: Storage,
    /** rows() views: free() on them is a no-op (the view dies with its parent). */
    readonly isView = false,
  ) {
    this.size = shapeSize(shape);
  }
  /** The elements (throws if the tensor was freed). */
  get data(): CpuData {
    if (this.storage.freed) {
      throw new BackendError(`cpu tensor [${this.shape.join(', ')}] ${this.dtype} used after free`, {
        hint: 'a tensor (or a view/reshape of it) was passed to backend.free() and then used again; free it later',
      });
    }
    return this._data;
  }
}

export function shapeSize(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new BackendError(`bad tensor shape [${shape.join(', ')}]: dims must be non-negative integers`);
    n *= d;
  }
  return n;
}

/** cpu storage dtype of a requested dtype: every float dtype is stored as float32. */
export function storageDtype(dtype: DType | 'act' | undefined): 'f32' | 'i32' | 'u8' {
  if (dtype === 'i32' || dtype === 'u8') return dtype;
  return 'f32';
}

export function asCpu(t: Tensor, what: string): CpuTensor {
  if (!(t instanceof CpuTensor)) {
    throw new BackendError(`${what}: expected a cpu tensor, got ${t?.constructor?.name ?? typeof t}`, {
      hint: 'tensors from another backend must be downloaded and uploaded again',
    });
  }
  return t;
}

/** The float32 elements of a cpu tensor (tests and helpers). */
export function cpuData(t: Tensor): Float32Array {
  const c = asCpu(t, 'cpuData');
  const d = c.data;
  if (!(d instanceof Float32Array)) throw new BackendError(`cpuData: tensor [${c.shape.join(', ')}] is ${c.dtype}, not f32`);
  return d;
}
