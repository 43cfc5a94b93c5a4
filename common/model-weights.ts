// The weights of a Hugging Face model directory, whatever the file format: safetensors (single or sharded)
// or PyTorch pickles (pytorch_model*.bin, read by common/torch-pickle.ts without executing anything).
import fs from 'node:fs';
import path from 'node:path';
import { FormatError, ShapeError, UnsupportedError } from './errors.ts';
import { describeJson as describe, jsonToPlain, parseJsonStrict } from './json-strict.ts';
import { INDEX_FILE, SINGLE_FILE, SafetensorsFile, type StDtype, type TensorInfo } from './safetensors.ts';

const BIN_INDEX_FILE = 'pytorch_model.bin.index.json';
const BIN_SINGLE_FILE = 'pytorch_model.bin';
import { TorchBinFile } from './torch-pickle.ts';

// ---------------------------------------------------------------------------------------------------------
// HF model directories


/** What ModelWeights needs of one weights file: a SafetensorsFile, or a PyTorch `.bin` (common/torch-pickle.ts). */
type WeightsFile = Pick<SafetensorsFile, 'names' | 'has' | 'info' | 'readRaw' | 'readF32' | 'readI32' | 'close'>;

/** The weights of an HF model directory (single file or sharded), tensor by tensor. */
export class ModelWeights {
  readonly dir: string;
  /** The index's "metadata" (sharded) or the single file's "__metadata__". */
  readonly metadata: Record<string, unknown>;
  private readonly files: WeightsFile[];
  private readonly where: Map<string, WeightsFile>;

  private constructor(dir: string, files: WeightsFile[], where: Map<string, WeightsFile>, metadata: Record<string, unknown>) {
    this.dir = dir;
    this.files = files;
    this.where = where;
    this.metadata = metadata;
  }

  /**
   * Opens `model.safetensors.index.json` (sharded), else `model.safetensors`, else the directory's only
   * `*.safetensors`; without safetensors, PyTorch pickles the same way (`pytorch_model.bin.index.json`,
   * `pytorch_model.bin`, the only `pytorch_model*.bin`) through the restricted reader of torch-pickle.ts.
   * Headers are read and validated now; tensor data when asked for.
   */
  static open(dir: string): ModelWeights {
    let listing: string[];
    try {
      listing = fs.readdirSync(dir);
    } catch (e) {
      throw new FormatError(`cannot read model directory ${dir}: ${(e as Error).message}`, { cause: e });
    }
    const has = (f: string): boolean => listing.includes(f);
    if (has(INDEX_FILE)) return ModelWeights.openSharded(dir);
    let single: string | null = has(SINGLE_FILE) ? SINGLE_FILE : null;
    if (!single) {
      const st = listing.filter((f) => f.endsWith('.safetensors')).sort();
      if (st.length === 1) single = st[0];
      else if (st.length > 1) {
        throw new FormatError(`${dir}: ${st.length} .safetensors files (${st.slice(0, 5).join(', ')}${st.length > 5 ? ', ...' : ''}) but no ${INDEX_FILE} or ${SINGLE_FILE}`, {
          hint: `add ${INDEX_FILE} mapping tensor names to shards, or keep only the model's weights file`,
        });
      }
    }
    if (single) {
      const f = SafetensorsFile.open(path.join(dir, single));
      const where = new Map<string, WeightsFile>();
      for (const name of f.names()) where.set(name, f);
      return new ModelWeights(dir, [f], where, { ...f.metadata });
    }
    if (has(BIN_INDEX_FILE)) return ModelWeights.openSharded(dir, BIN_INDEX_FILE, TorchBinFile.open);
    const pickled = listing.filter((f) => /^pytorch_model.*\.bin$/.test(f)).sort();
    const bin = has(BIN_SINGLE_FILE) ? BIN_SINGLE_FILE : pickled.length === 1 ? pickled[0] : null;
    if (bin) {
      const f = TorchBinFile.open(path.join(dir, bin));
      const where = new Map<string, WeightsFile>();
      for (const name of f.names()) where.set(name, f);
      return new ModelWeights(dir, [f], where, {});
    }
    if (pickled.length > 1) {
      throw new FormatError(`${dir}: ${pickled.length} pytorch_model*.bin files (${pickled.slice(0, 5).join(', ')}${pickled.length > 5 ? ', ...' : ''}) but no ${BIN_INDEX_FILE}`, {
        hint: `add ${BIN_INDEX_FILE} mapping tensor names to shards (the download is incomplete?)`,
      });
    }
    throw new FormatError(`${dir}: no model weights found (looked for ${INDEX_FILE}, ${SINGLE_FILE}, *.safetensors, pytorch_model*.bin)`, {
      hint: 'point --model at a Hugging Face model directory',
    });
  }

  private static openSharded(dir: string, indexFile = INDEX_FILE, openFile: (p: string) => WeightsFile = SafetensorsFile.open): ModelWeights {
    const indexPath = path.join(dir, indexFile);
    let text: string;
    try {
      text = fs.readFileSync(indexPath, 'utf8');
    } catch (e) {
      throw new FormatError(`cannot read ${indexPath}: ${(e as Error).message}`, { cause: e });
    }
    const root = parseJsonStrict(text, indexPath);
    if (!(root instanceof Map)) throw new FormatError(`${indexPath}: must be a JSON object with "weight_map"`);
    const wm = root.get('weight_map');
    if (!(wm instanceof Map)) throw new FormatError(`${indexPath}: "weight_map" must be an object {tensor name: shard file}, found ${describe(wm)}`);
    const md = root.get('metadata');
    const metadata = md instanceof Map ? (jsonToPlain(md) as Record<string, unknown>) : {};
    const shards = new Map<string, WeightsFile>();
    const where = new Map<string, WeightsFile>();
    try {
      for (const [name, shard] of wm) {
        // The shard name comes from the (untrusted) index: it must name a file in this directory.
        if (typeof shard !== 'string' || shard === '' || shard !== path.basename(shard) || shard === '.' || shard === '..' || shard.includes('\\')) {
          throw new FormatError(`${indexPath}: weight_map["${name}"] = ${describe(shard)} is not a file name in the model directory`);
        }
        let f = shards.get(shard);
        if (!f) {
          const sp = path.join(dir, shard);
          if (!fs.existsSync(sp)) throw new FormatError(`${indexPath}: shard ${shard} (holding '${name}') does not exist`, { hint: 'the download is incomplete' });
          f = openFile(sp);
          shards.set(shard, f);
        }
        if (!f.has(name)) throw new FormatError(`${indexPath}: tensor '${name}' is mapped to ${shard}, which does not contain it`);
        where.set(name, f);
      }
    } catch (e) {
      for (const f of shards.values()) f.close();
      throw e;
    }
    return new ModelWeights(dir, [...shards.values()], where, metadata);
  }

  /** Tensor names (index order when sharded, file order otherwise). */
  names(): string[] {
    return [...this.where.keys()];
  }

  has(name: string): boolean {
    return this.where.has(name);
  }

  info(name: string): TensorInfo {
    return this.file(name).info(name);
  }

  readRaw(name: string): Uint8Array {
    return this.file(name).readRaw(name);
  }

  readF32(name: string): Float32Array {
    return this.file(name).readF32(name);
  }

  readI32(name: string): Int32Array {
    return this.file(name).readI32(name);
  }

  close(): void {
    for (const f of this.files) f.close();
  }

  private file(name: string): WeightsFile {
    const f = this.where.get(name);
    if (!f) throw new FormatError(`${this.dir}: the model has no tensor named '${name}'`, { hint: 'does the config.json match these weights?' });
    return f;
  }
}

