// The subset of Kubernetes strategic-merge-patch semantics the overlays use, so the generator can compute
// what `kubectl kustomize overlays/X` renders (test/deploy checks the two agree when kubectl is present):
// maps merge recursively, lists named below merge by their key, every other list is replaced, null deletes.
type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
export type JsonObject = { [k: string]: Json };

/** patchMergeKey of the list fields we patch (from the Kubernetes API: core/v1 types). */
const MERGE_KEYS: Record<string, string> = {
  containers: 'name',
  initContainers: 'name',
  env: 'name',
  volumes: 'name',
  volumeMounts: 'mountPath',
  ports: 'containerPort',
};

const isObject = (v: Json | undefined): v is JsonObject => typeof v === 'object' && v !== null && !Array.isArray(v);

function mergeList(key: string, base: Json[], patch: Json[]): Json[] {
  const k = MERGE_KEYS[key];
  if (!k) return structuredClone(patch);
  const out = structuredClone(base);
  const added: Json[] = [];
  for (const p of patch) {
    if (!isObject(p)) throw new Error(`strategic merge: list ${key} holds a non-object`);
    const i = out.findIndex((b) => isObject(b) && b[k] === p[k]);
    if (i < 0) added.push(structuredClone(p));
    else out[i] = merge(out[i] as JsonObject, p);
  }
  // kubectl's strategic merge puts the patch's new items first, in patch order.
  return [...added, ...out];
}

/** base ⊕ patch (neither is modified). */
export function merge(base: JsonObject, patch: JsonObject): JsonObject {
  const out: JsonObject = structuredClone(base);
  for (const [key, pv] of Object.entries(patch)) {
    const bv = out[key];
    if (pv === null) delete out[key];
    else if (isObject(pv) && isObject(bv)) out[key] = merge(bv, pv);
    else if (Array.isArray(pv) && Array.isArray(bv)) out[key] = mergeList(key, bv, pv);
    else out[key] = structuredClone(pv);
  }
  return out;
}
