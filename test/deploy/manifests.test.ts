// deploy/k8s: the generated kustomize trees are current, every object validates against the Kubernetes / CRD
// schemas, and the rendered overlays hold together: references resolve, secrets stay out of ConfigMaps, every
// container is sized, probed and locked down, the job.yaml agrees with the worker Job and with the runtime's
// own config schema and command-line flags; with kubectl, `kubectl kustomize` renders what the generator says.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml, parseAllDocuments } from 'yaml';
import { generateDeploy } from '../../deploy/gen/index.ts';
import { buildK8s, validateObject, type K8sObject } from '../../deploy/gen/k8s.ts';
import { defaultDeployConfig as cfg, ENV, SECRET_KEYS, names } from '../../deploy/gen/config.ts';
import { merge } from '../../deploy/gen/smp.ts';
import { parseJob } from '../../coordinator/job.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const deployDir = path.join(root, 'deploy');
const n = names(cfg);
const { rendered } = buildK8s(cfg);
const OVERLAYS = ['cpu', 'gpu', 'mtls'];

type Obj = Record<string, unknown>;
const get = (o: unknown, ...keys: string[]): unknown => keys.reduce<unknown>((x, k) => (x && typeof x === 'object' ? (x as Obj)[k] : undefined), o);
const podSpec = (o: K8sObject): Obj | undefined => get(o, 'spec', 'template', 'spec') as Obj | undefined;
const containers = (o: K8sObject): Obj[] => (podSpec(o)?.containers as Obj[] | undefined) ?? [];
const find = (objs: K8sObject[], kind: string, name: string): K8sObject => {
  const o = objs.find((x) => x.kind === kind && x.metadata.name === name);
  assert.ok(o, `${kind}/${name} is rendered`);
  return o;
};
const jobOf = (objs: K8sObject[]) => {
  const text = get(find(objs, 'ConfigMap', n.job), 'data', 'job.yaml') as string;
  return parseJob(parseYaml(text), 'job.yaml', '/');
};

test('the committed deploy/ files are exactly what scripts/gen-deploy.ts writes (regenerated into a temp dir)', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-deploy-'));
  try {
    const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(root, 'scripts', 'gen-deploy.ts'), '--out', tmp], { cwd: root, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const files = generateDeploy();
    assert.ok(files.size >= 25, `generator writes ${files.size} files`);
    for (const p of files.keys()) {
      const fresh = fs.readFileSync(path.join(tmp, p), 'utf8');
      const committed = fs.readFileSync(path.join(deployDir, p), 'utf8');
      assert.equal(committed, fresh, `deploy/${p} is stale: run node --import tsx scripts/gen-deploy.ts`);
    }
    const check = spawnSync(process.execPath, ['--import', 'tsx', path.join(root, 'scripts', 'gen-deploy.ts'), '--check'], { cwd: root, encoding: 'utf8' });
    assert.equal(check.status, 0, check.stderr);
    assert.match(check.stdout, /up to date/);
    // --check notices a hand edit.
    fs.writeFileSync(path.join(tmp, 'k8s/base/workers.yaml'), 'edited\n');
    const stale = spawnSync(process.execPath, ['--import', 'tsx', path.join(root, 'scripts', 'gen-deploy.ts'), '--check', '--out', tmp], { cwd: root, encoding: 'utf8' });
    assert.equal(stale.status, 1);
    assert.match(stale.stderr, /k8s\/base\/workers\.yaml/);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

test('every object in the committed YAML files validates against its Kubernetes / CRD schema', () => {
  let count = 0;
  for (const p of generateDeploy().keys()) {
    if (!p.startsWith('k8s/') || !p.endsWith('.yaml') || p.endsWith('kustomization.yaml') || p.endsWith('job.yaml') || p.includes('-patch')) continue;
    for (const doc of parseAllDocuments(fs.readFileSync(path.join(deployDir, p), 'utf8'))) {
      const o = doc.toJS() as K8sObject;
      assert.doesNotThrow(() => validateObject(o), `${p}: ${o.kind}/${o.metadata?.name}`);
      count++;
    }
  }
  assert.ok(count >= 20, `${count} objects validated`);
  // And the validation does catch a broken object.
  const sts = structuredClone(find(rendered.get('gpu')!, 'Job', n.worker));
  (containers(sts)[0].ports as Obj[])[0].containerPort = 'fifty';
  assert.throws(() => validateObject(sts), /containerPort/);
});

test('every rendered overlay object validates, and names, namespaces and references resolve', () => {
  for (const ov of OVERLAYS) {
    const objs = rendered.get(ov)!;
    const kinds = new Set(objs.map((o) => o.kind));
    for (const k of ['Namespace', 'PersistentVolumeClaim', 'ConfigMap', 'Secret', 'Deployment', 'Job', 'Service', 'NetworkPolicy', 'PodDisruptionBudget', 'ServiceMonitor', 'PodMonitor', 'PrometheusRule']) {
      assert.ok(kinds.has(k), `${ov}: renders a ${k}`);
    }
    const seen = new Set<string>();
    for (const o of objs) {
      validateObject(o);
      const id = `${o.kind}/${o.metadata.name}`;
      assert.ok(!seen.has(id), `${ov}: ${id} rendered once`);
      seen.add(id);
      if (o.kind !== 'Namespace') assert.equal(o.metadata.namespace, cfg.namespace, `${ov}: ${id} namespace`);
    }
    for (const o of objs.filter((x) => podSpec(x))) {
      const spec = podSpec(o)!;
      const volumes = (spec.volumes as Obj[]) ?? [];
      const volNames = new Set(volumes.map((v) => v.name));
      for (const v of volumes) {
        const cm = get(v, 'configMap', 'name'); if (cm) find(objs, 'ConfigMap', cm as string);
        const pvc = get(v, 'persistentVolumeClaim', 'claimName'); if (pvc) find(objs, 'PersistentVolumeClaim', pvc as string);
        const sec = get(v, 'secret', 'secretName');
        // TLS secrets are written by cert-manager from the Certificate objects.
        if (sec) assert.ok(objs.some((x) => x.kind === 'Certificate' && get(x, 'spec', 'secretName') === sec), `${ov}: secret volume ${String(sec)} has a Certificate`);
      }
      for (const ct of containers(o)) {
        for (const m of (ct.volumeMounts as Obj[]) ?? []) assert.ok(volNames.has(m.name), `${ov}: ${o.metadata.name}/${String(ct.name)} mounts declared volume ${String(m.name)}`);
        for (const e of (ct.env as Obj[]) ?? []) {
          const ref = get(e, 'valueFrom', 'secretKeyRef') as Obj | undefined;
          if (!ref) continue;
          const secret = find(objs, 'Secret', ref.name as string);
          assert.ok(Object.keys(secret.data as Obj).includes(ref.key as string), `${ov}: secret key ${String(ref.key)} exists`);
        }
        const portNames = new Set(((ct.ports as Obj[]) ?? []).map((p) => p.name));
        for (const pr of ['startupProbe', 'livenessProbe', 'readinessProbe']) {
          const port = get(ct, pr, 'httpGet', 'port');
          assert.ok(portNames.has(port), `${ov}: ${String(ct.name)} ${pr} port ${String(port)} is a named container port`);
        }
      }
    }
    // Services select pods that have every targetPort they forward to.
    for (const svc of objs.filter((o) => o.kind === 'Service')) {
      const sel = get(svc, 'spec', 'selector') as Record<string, string>;
      const pods = objs.filter((o) => podSpec(o) && Object.entries(sel).every(([k, v]) => (get(o, 'spec', 'template', 'metadata', 'labels') as Obj)[k] === v));
      assert.equal(pods.length, 1, `${ov}: Service ${svc.metadata.name} selects one workload`);
      const ports = new Set(containers(pods[0]).flatMap((ct) => ((ct.ports as Obj[]) ?? []).map((p) => p.name)));
      for (const p of get(svc, 'spec', 'ports') as Obj[]) assert.ok(ports.has(p.targetPort), `${ov}: ${svc.metadata.name} → ${String(p.targetPort)}`);
    }
    // Monitors select what exposes a `metrics` port, and set the job label from dqlora.io/job.
    const sm = find(objs, 'ServiceMonitor', n.coordinator);
    assert.equal(get(sm, 'spec', 'jobLabel'), 'dqlora.io/job');
    const coordSvc = find(objs, 'Service', n.coordinator);
    assert.deepEqual(get(sm, 'spec', 'selector', 'matchLabels'), get(coordSvc, 'spec', 'selector'));
    assert.equal((coordSvc.metadata.labels as Obj)['dqlora.io/job'], cfg.jobName);
    const pm = find(objs, 'PodMonitor', n.worker);
    const sts = find(objs, 'Job', n.worker);
    for (const [k, v] of Object.entries(get(pm, 'spec', 'selector', 'matchLabels') as Obj)) assert.equal((get(sts, 'spec', 'template', 'metadata', 'labels') as Obj)[k], v, `PodMonitor selects the worker pods (${k})`);
    assert.equal((get(sts, 'spec', 'template', 'metadata', 'labels') as Obj)['dqlora.io/job'], cfg.jobName);
    for (const m of [sm, pm, find(objs, 'PrometheusRule', n.alerts)]) {
      for (const [k, v] of Object.entries(cfg.monitoringLabels)) assert.equal((m.metadata.labels as Obj)[k], v, `${m.kind} carries ${k} for the Prometheus selector`);
    }
  }
});

test('secrets never appear in ConfigMaps or plain env values; NATS reads its credentials from the Secret', () => {
  for (const ov of OVERLAYS) {
    const objs = rendered.get(ov)!;
    for (const cm of objs.filter((o) => o.kind === 'ConfigMap')) {
      for (const [key, text] of Object.entries(cm.data as Record<string, string>)) {
        assert.doesNotMatch(text, /(password|passwd|token|secret|nkey)\s*[:=]\s*(?!\$)["']?[A-Za-z0-9+/_-]{4,}/i, `${ov}: ConfigMap ${cm.metadata.name}/${key} holds no credential literal`);
        assert.doesNotMatch(text, /nats:\/\/[^/\s]*@/, `${ov}: no credentials in NATS URLs (${cm.metadata.name}/${key})`);
      }
    }
    const natsConf = get(find(objs, 'ConfigMap', n.natsConfig), 'data', 'nats.conf') as string;
    assert.match(natsConf, /user: \$NATS_USER/);
    assert.match(natsConf, /password: \$NATS_PASSWORD/);
    for (const o of objs.filter((x) => podSpec(x))) {
      for (const ct of containers(o)) {
        for (const e of (ct.env as Obj[]) ?? []) {
          if (/TOKEN|PASSWORD|NATS_USER/.test(e.name as string)) {
            assert.equal(e.value, undefined, `${ov}: ${String(ct.name)} ${String(e.name)} is not a literal`);
            assert.equal(typeof get(e, 'valueFrom', 'secretKeyRef', 'name'), 'string', `${ov}: ${String(ct.name)} ${String(e.name)} comes from a Secret`);
          }
        }
        assert.ok(!JSON.stringify(ct.args ?? []).match(/token|password/i), `${ov}: ${String(ct.name)} passes no credential on the command line`);
      }
    }
    const natsEnv = (containers(find(objs, 'Deployment', n.nats))[0].env as Obj[]).map((e) => [e.name, get(e, 'valueFrom', 'secretKeyRef', 'key')]);
    assert.deepEqual(natsEnv, [['NATS_USER', SECRET_KEYS.natsUser], ['NATS_PASSWORD', SECRET_KEYS.natsPassword]]);
    const worker = containers(find(objs, 'Job', n.worker))[0];
    const envKeys = Object.fromEntries((worker.env as Obj[]).map((e) => [e.name, get(e, 'valueFrom', 'secretKeyRef', 'key')]));
    assert.equal(envKeys[ENV.jobToken], SECRET_KEYS.jobToken);
    assert.equal(envKeys[ENV.natsUser], SECRET_KEYS.natsUser);
    assert.equal(envKeys[ENV.natsPassword], SECRET_KEYS.natsPassword);
  }
  // The secrets file itself is git-ignored; only the example (with empty values) is committed.
  assert.equal(fs.readFileSync(path.join(deployDir, 'k8s/base/.gitignore'), 'utf8').trim(), 'secrets.env');
  const example = fs.readFileSync(path.join(deployDir, 'k8s/base/secrets.env.example'), 'utf8');
  assert.match(example, new RegExp(`^${SECRET_KEYS.jobToken}=$`, 'm'));
  assert.match(example, new RegExp(`^${SECRET_KEYS.natsPassword}=$`, 'm'));
});

test('every container has requests and limits, startup/liveness/readiness probes, and runs non-root on a read-only root', () => {
  for (const ov of OVERLAYS) {
    for (const o of rendered.get(ov)!.filter((x) => podSpec(x))) {
      const spec = podSpec(o)!;
      assert.equal(get(spec, 'securityContext', 'runAsNonRoot'), true, `${ov}: ${o.metadata.name} runAsNonRoot`);
      assert.equal(get(spec, 'securityContext', 'runAsUser'), cfg.uid);
      assert.equal(spec.automountServiceAccountToken, false, `${ov}: ${o.metadata.name} has no API token`);
      for (const ct of containers(o)) {
        const where = `${ov}: ${o.metadata.name}/${String(ct.name)}`;
        for (const kind of ['requests', 'limits']) {
          const r = get(ct, 'resources', kind) as Obj | undefined;
          assert.ok(r?.cpu && r?.memory, `${where} has ${kind}.cpu and ${kind}.memory`);
        }
        // Liveness: the process answers; readiness: it can work (a worker: a stage loaded). NATS has only /healthz.
        for (const pr of ['startupProbe', 'livenessProbe']) assert.equal(get(ct, pr, 'httpGet', 'path'), '/healthz', `${where} ${pr} on /healthz`);
        assert.equal(get(ct, 'readinessProbe', 'httpGet', 'path'), ct.name === 'nats' ? '/healthz' : '/readyz', `${where} readinessProbe`);
        assert.equal(get(ct, 'securityContext', 'readOnlyRootFilesystem'), true, `${where} read-only root`);
        assert.equal(get(ct, 'securityContext', 'allowPrivilegeEscalation'), false);
        assert.deepEqual(get(ct, 'securityContext', 'capabilities', 'drop'), ['ALL']);
      }
    }
  }
});

test('gpu overlay: one nvidia.com/gpu per worker, GPU nodes, cuda device and image; cpu overlay asks for no GPU', () => {
  const gpu = find(rendered.get('gpu')!, 'Job', n.worker);
  const w = containers(gpu)[0];
  assert.equal(get(w, 'resources', 'requests', 'nvidia.com/gpu'), '1');
  assert.equal(get(w, 'resources', 'limits', 'nvidia.com/gpu'), '1');
  assert.deepEqual(podSpec(gpu)!.tolerations, [{ key: 'nvidia.com/gpu', operator: 'Exists', effect: 'NoSchedule' }]);
  assert.deepEqual(podSpec(gpu)!.nodeSelector, { 'nvidia.com/gpu.present': 'true' });
  const args = w.args as string[];
  assert.equal(args[args.indexOf('--device') + 1], 'cuda');
  assert.equal(w.image, `${cfg.registry}/worker:${cfg.tag}-cuda`);
  const cpu = find(rendered.get('cpu')!, 'Job', n.worker);
  const c = containers(cpu)[0];
  assert.equal(get(c, 'resources', 'limits', 'nvidia.com/gpu'), undefined);
  assert.equal(podSpec(cpu)!.tolerations, undefined);
  assert.equal((c.args as string[])[(c.args as string[]).indexOf('--device') + 1], 'cpu');
  assert.equal(c.image, `${cfg.registry}/worker:${cfg.tag}-cpu`);
  // The coordinator holds no tensors: CPU image, no GPU, in every overlay.
  for (const ov of OVERLAYS) {
    const co = containers(find(rendered.get(ov)!, 'Job', n.coordinator))[0];
    assert.equal(co.image, `${cfg.registry}/coordinator:${cfg.tag}-cpu`);
    assert.equal(get(co, 'resources', 'limits', 'nvidia.com/gpu'), undefined);
  }
});

test('job.yaml passes the coordinator\'s schema and agrees with the worker Job, Services and worker flags', () => {
  for (const ov of OVERLAYS) {
    const objs = rendered.get(ov)!;
    const job = jobOf(objs);
    const o = cfg.overlays.find((x) => x.name === (ov === 'mtls' ? 'gpu' : ov))!;
    assert.equal(job.distributed.stages, o.stages);
    assert.equal(job.distributed.replicas, o.replicas);
    assert.equal(job.distributed.workers, o.stages * o.replicas, `${ov}: workers = stages × replicas`);
    const sts = find(objs, 'Job', n.worker);
    assert.equal(get(sts, 'spec', 'completions'), o.stages * o.replicas, `${ov}: worker Job completions = stages × replicas`);
    assert.equal(get(sts, 'spec', 'parallelism'), o.stages * o.replicas, `${ov}: all workers run at once`);
    assert.equal(job.backend, o.device);
    assert.equal(job.name, cfg.jobName);
    assert.ok(job.output_dir.startsWith('/outputs/') && job.model.startsWith('/models/') && job.data.train.startsWith('/models/'), `${ov}: paths on the volumes`);

    const coordSvcPorts = Object.fromEntries((get(find(objs, 'Service', n.coordinator), 'spec', 'ports') as Obj[]).map((p) => [p.name, p.port]));
    assert.equal(job.distributed.listen, `0.0.0.0:${coordSvcPorts.control}`);
    assert.equal(job.distributed.metrics_port, coordSvcPorts.metrics);
    const natsPort = (get(find(objs, 'Service', n.nats), 'spec', 'ports') as Obj[]).find((p) => p.name === 'client')!.port;
    assert.equal(job.distributed.nats_url, `nats://${n.nats}:${String(natsPort)}`);

    const w = containers(sts)[0];
    const args = w.args as string[];
    const flag = (f: string) => args[args.indexOf(f) + 1];
    assert.equal(args[0], 'start');
    assert.equal(flag('--coordinator'), `${n.coordinator}:${String(coordSvcPorts.control)}`);
    const wPorts = Object.fromEntries((w.ports as Obj[]).map((p) => [p.name, p.containerPort]));
    assert.equal(flag('--listen'), `0.0.0.0:${String(wPorts.pipeline)}`);
    assert.equal(flag('--metrics-port'), String(wPorts.metrics));
    assert.equal(flag('--advertise'), `${n.worker}-$(JOB_COMPLETION_INDEX).${n.worker}.$(POD_NAMESPACE).svc:${String(wPorts.pipeline)}`);
    assert.ok((w.env as Obj[]).some((e) => e.name === 'JOB_COMPLETION_INDEX'), 'the index variable is declared, so $(JOB_COMPLETION_INDEX) expands');
    assert.equal(podSpec(sts)!.subdomain, n.worker, 'pods get <job>-<index>.<headless service> names');
    assert.equal(get(find(objs, 'Service', n.worker), 'spec', 'clusterIP'), 'None');
    const c = containers(find(objs, 'Job', n.coordinator))[0];
    assert.deepEqual(c.args, ['start', '-c', '/etc/dqlora/job/job.yaml', '--no-progress']);
    assert.ok(((c.volumeMounts as Obj[]).find((m) => m.mountPath === '/etc/dqlora/job')), 'job ConfigMap mounted where -c points');
  }
});

test('the flags the manifests pass exist in the real worker and coordinator CLIs', () => {
  const help = (bin: string) => {
    const r = spawnSync(process.execPath, [path.join(root, 'bin', bin), 'start', '--help'], { cwd: root, encoding: 'utf8', env: { ...process.env, DQLORA_LOG_LEVEL: 'silent' } });
    assert.equal(r.status, 0, r.stderr);
    return r.stdout;
  };
  const workerHelp = help('worker.js');
  const coordHelp = help('coordinator.js');
  for (const ov of OVERLAYS) {
    const objs = rendered.get(ov)!;
    for (const a of (containers(find(objs, 'Job', n.worker))[0].args as string[]).filter((x) => x.startsWith('--'))) {
      assert.ok(workerHelp.includes(a + ' '), `worker start accepts ${a}`);
    }
    for (const a of (containers(find(objs, 'Job', n.coordinator))[0].args as string[]).filter((x) => x.startsWith('-'))) {
      assert.ok(coordHelp.includes(a), `coordinator start accepts ${a}`);
    }
  }
  assert.match(workerHelp, /DQLORA_JOB_TOKEN/, 'the worker reads its token from DQLORA_JOB_TOKEN');
  assert.match(coordHelp, /DQLORA_JOB_TOKEN/, 'the coordinator reads its token from DQLORA_JOB_TOKEN');
});

test('mtls overlay: cert-manager CA, coordinator and wildcard worker certificates, mounted with their paths in env', () => {
  const objs = rendered.get('mtls')!;
  const certs = objs.filter((o) => o.kind === 'Certificate');
  assert.equal(certs.length, 4);
  const ca = find(objs, 'Certificate', n.tls.ca);
  assert.equal(get(ca, 'spec', 'isCA'), true);
  assert.equal(get(find(objs, 'Issuer', n.tls.ca), 'spec', 'ca', 'secretName'), n.tls.ca);
  assert.ok((get(find(objs, 'Certificate', n.tls.coordinator), 'spec', 'dnsNames') as string[]).includes(n.coordinator), 'coordinator cert covers the Service name workers dial');
  assert.ok((get(find(objs, 'Certificate', n.tls.worker), 'spec', 'dnsNames') as string[]).includes(`*.${n.worker}.${cfg.namespace}.svc`), 'worker cert covers the advertised pod names');
  for (const c of certs.filter((x) => x !== ca)) assert.deepEqual(get(c, 'spec', 'usages'), ['server auth', 'client auth', 'digital signature']);
  for (const [kind, name] of [['Job', n.coordinator], ['Job', n.worker]] as const) {
    const ct = containers(find(objs, kind, name))[0];
    const env = Object.fromEntries((ct.env as Obj[]).map((e) => [e.name, e.value]));
    assert.equal(env[ENV.tlsCa], '/etc/dqlora/tls/ca.crt');
    assert.equal(env[ENV.tlsCert], '/etc/dqlora/tls/tls.crt');
    assert.equal(env[ENV.tlsKey], '/etc/dqlora/tls/tls.key');
    // The env patch merged into the base env instead of replacing it.
    assert.ok(env[ENV.jobToken] === undefined && (ct.env as Obj[]).some((e) => e.name === ENV.jobToken));
  }
  // NATS requires TLS with verified client certificates; workers present theirs to NATS too.
  const natsConf = get(find(objs, 'ConfigMap', n.natsConfig), 'data', 'nats.conf') as string;
  assert.match(natsConf, /tls \{\n  cert_file: "\/etc\/dqlora\/tls\/tls.crt"\n  key_file: "\/etc\/dqlora\/tls\/tls.key"\n  ca_file: "\/etc\/dqlora\/tls\/ca.crt"\n  verify: true/);
  assert.match(natsConf, /user: \$NATS_USER/, 'credentials still required');
  const nats = find(objs, 'Deployment', n.nats);
  assert.ok((containers(nats)[0].volumeMounts as Obj[]).some((m) => m.mountPath === '/etc/dqlora/tls'));
  assert.ok((get(find(objs, 'Certificate', n.tls.nats), 'spec', 'dnsNames') as string[]).includes(n.nats), 'NATS cert covers the Service name workers dial');
  const wenv = Object.fromEntries((containers(find(objs, 'Job', n.worker))[0].env as Obj[]).map((e) => [e.name, e.value]));
  assert.equal(wenv[ENV.natsTlsCa], '/etc/dqlora/tls/ca.crt');
  assert.equal(wenv[ENV.natsTlsCert], '/etc/dqlora/tls/tls.crt');
  assert.equal(wenv[ENV.natsTlsKey], '/etc/dqlora/tls/tls.key');
  assert.doesNotMatch(get(find(rendered.get('gpu')!, 'ConfigMap', n.natsConfig), 'data', 'nats.conf') as string, /tls \{/, 'plain overlays stay plaintext');
  // gpu's objects are otherwise unchanged.
  assert.equal(objs.length, rendered.get('gpu')!.length + 6);
});

test('run to completion: coordinator Job and Indexed worker Job, never restarted after success; signals and preemption resume', () => {
  for (const ov of OVERLAYS) {
    const objs = rendered.get(ov)!;
    assert.ok(!objs.some((o) => o.kind === 'StatefulSet' || (o.kind === 'Deployment' && o.metadata.name !== n.nats)), `${ov}: no Deployment/StatefulSet restarts a finished coordinator or worker`);
    const co = find(objs, 'Job', n.coordinator);
    assert.equal(get(co, 'spec', 'completions'), 1);
    assert.equal(get(co, 'spec', 'parallelism'), 1, 'never two coordinators writing one output_dir');
    assert.equal(podSpec(co)!.restartPolicy, 'Never', 'podFailurePolicy needs restartPolicy Never');
    const rules = get(co, 'spec', 'podFailurePolicy', 'rules') as Obj[];
    assert.deepEqual(rules.map((r) => [r.action, get(r, 'onExitCodes', 'values') ?? get(r, 'onPodConditions')]), [
      ['Ignore', [{ type: 'DisruptionTarget', status: 'True' }]], ['Ignore', [75]], ['FailJob', [1]],
    ], 'preempted / stopped-after-checkpoint: replaced, not counted; exit 1: failed for good');
    const env = Object.fromEntries((containers(co)[0].env as Obj[]).map((e) => [e.name, e.value]));
    assert.ok(Number(env[ENV.stopGrace]) < (podSpec(co)!.terminationGracePeriodSeconds as number), 'the checkpoint deadline comes before the kubelet\'s SIGKILL');
    assert.ok(Number(env[ENV.linger]) >= 30, 'the final metrics stay up for two 15 s scrapes');
    const w = find(objs, 'Job', n.worker);
    assert.equal(get(w, 'spec', 'completionMode'), 'Indexed');
    assert.equal(podSpec(w)!.restartPolicy, 'Never');
    assert.deepEqual((get(w, 'spec', 'podFailurePolicy', 'rules') as Obj[]).map((r) => r.action), ['Ignore', 'Ignore']);
    assert.ok((get(w, 'spec', 'backoffLimit') as number) >= (get(w, 'spec', 'completions') as number), 'a few real failures per worker are retried');
  }
});

test('network: default deny both ways, then only the job\'s flows; metrics only from the monitoring namespace; DNS out', () => {
  for (const ov of OVERLAYS) {
    const pols = rendered.get(ov)!.filter((o) => o.kind === 'NetworkPolicy');
    const deny = pols.find((p) => Object.keys(get(p, 'spec', 'podSelector') as Obj).length === 0)!;
    assert.ok(deny, `${ov}: a policy selects every pod`);
    assert.deepEqual(get(deny, 'spec', 'policyTypes'), ['Ingress', 'Egress']);
    assert.equal(get(deny, 'spec', 'ingress'), undefined, 'no ingress rule: deny');
    assert.equal(get(deny, 'spec', 'egress'), undefined, 'no egress rule: deny');
    const of = (component: string) => pols.find((p) => get(p, 'spec', 'podSelector', 'matchLabels', 'app.kubernetes.io/component') === component)!;
    const ingressPorts = (p: K8sObject) => (get(p, 'spec', 'ingress') as Obj[]).map((r) => [(r.ports as Obj[])[0].port, JSON.stringify(r.from)]);
    const workers = JSON.stringify([{ podSelector: { matchLabels: { 'app.kubernetes.io/name': 'dqlora', 'app.kubernetes.io/component': 'worker' } } }]);
    const prom = JSON.stringify([{ namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': cfg.monitoringNamespace } } }]);
    assert.deepEqual(ingressPorts(of('nats')), [[cfg.ports.nats, workers]], 'NATS: clients are workers; 8222 is not open to the cluster');
    assert.deepEqual(ingressPorts(of('coordinator')), [[cfg.ports.control, workers], [cfg.ports.coordinatorMetrics, prom]]);
    assert.deepEqual(ingressPorts(of('worker')), [[cfg.ports.pipeline, workers], [cfg.ports.workerMetrics, prom]]);
    const egressPorts = (p: K8sObject) => (get(p, 'spec', 'egress') as Obj[]).flatMap((r) => (r.ports as Obj[]).map((x) => `${String(x.protocol)}/${String(x.port)}`));
    assert.deepEqual(egressPorts(of('coordinator')), ['UDP/53', 'TCP/53'], 'the coordinator dials nobody but DNS');
    assert.deepEqual(egressPorts(of('nats')), ['UDP/53', 'TCP/53']);
    assert.deepEqual(egressPorts(of('worker')), ['UDP/53', 'TCP/53', `TCP/${cfg.ports.control}`, `TCP/${cfg.ports.pipeline}`, `TCP/${cfg.ports.nats}`]);
    for (const p of pols) for (const r of (get(p, 'spec', 'ingress') as Obj[] | undefined) ?? []) assert.ok(Array.isArray(r.from) && (r.from as Obj[]).length > 0, `${p.metadata.name}: no ingress rule open to everyone`);
  }
});

test('disruption budgets keep a drain from evicting a running job; images pinned; storage class and digests are parameters', () => {
  const objs = rendered.get('gpu')!;
  for (const component of ['coordinator', 'worker', 'nats']) {
    const pdb = find(objs, 'PodDisruptionBudget', `${cfg.prefix}-${component}`);
    assert.equal(get(pdb, 'spec', 'maxUnavailable'), 0);
    assert.equal(get(pdb, 'spec', 'selector', 'matchLabels', 'app.kubernetes.io/component'), component);
  }
  const natsImage = containers(find(objs, 'Deployment', n.nats))[0].image as string;
  assert.match(natsImage, /^nats:\d+\.\d+\.\d+-alpine$/, 'NATS is a fixed release, not a floating minor tag');

  const digest = (c: string) => `sha256:${c.repeat(64)}`;
  const pinned = buildK8s({ ...cfg, imageDigests: { coordinator: digest('a'), workerCuda: digest('b'), nats: digest('c') }, storage: { models: { size: '1Gi', storageClassName: 'cephfs' }, outputs: { size: '1Gi', storageClassName: 'cephfs-rwx' } } });
  const po = pinned.rendered.get('gpu')!;
  assert.equal(containers(find(po, 'Job', n.coordinator))[0].image, `${cfg.registry}/coordinator@${digest('a')}`);
  assert.equal(containers(find(po, 'Job', n.worker))[0].image, `${cfg.registry}/worker@${digest('b')}`);
  assert.equal(containers(find(po, 'Deployment', n.nats))[0].image, `nats@${digest('c')}`);
  assert.match(pinned.files.get('overlays/gpu/kustomization.yaml')!, new RegExp(`digest: ${digest('b')}`));
  assert.equal(get(find(po, 'PersistentVolumeClaim', n.models), 'spec', 'storageClassName'), 'cephfs');
  assert.equal(get(find(po, 'PersistentVolumeClaim', n.outputs), 'spec', 'storageClassName'), 'cephfs-rwx');
  assert.equal(get(find(objs, 'PersistentVolumeClaim', n.outputs), 'spec', 'storageClassName'), undefined, 'null: the cluster default');
  assert.throws(() => buildK8s({ ...cfg, imageDigests: { coordinator: 'latest' } }), /imageDigests: latest is not sha256/);
});

test('strategic merge: maps merge, keyed lists merge by key (new items first), other lists are replaced, null deletes', () => {
  const base = { spec: { a: 1, b: { c: 2 }, containers: [{ name: 'x', image: 'i', args: ['1', '2'], env: [{ name: 'A', value: '1' }] }], tolerations: [{ key: 'k' }] } };
  const out = merge(base, { spec: { b: { d: 3 }, containers: [{ name: 'x', args: ['3'], env: [{ name: 'B', value: '2' }, { name: 'A', value: '9' }] }, { name: 'y', image: 'j' }], tolerations: [], a: null } });
  assert.deepEqual(out, { spec: { b: { c: 2, d: 3 }, containers: [{ name: 'y', image: 'j' }, { name: 'x', image: 'i', args: ['3'], env: [{ name: 'B', value: '2' }, { name: 'A', value: '9' }] }], tolerations: [] } });
  assert.deepEqual(base.spec.containers[0].args, ['1', '2'], 'inputs untouched');
});

const kubectlMissing = spawnSync('kubectl', ['version', '--client'], { stdio: 'ignore' }).error ? 'kubectl is not installed; skipping the kustomize rendering comparison' : undefined;

test('kubectl kustomize renders each overlay exactly as the generator computes it', { skip: kubectlMissing }, () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-kustomize-'));
  try {
    fs.cpSync(path.join(deployDir, 'k8s'), path.join(tmp, 'k8s'), { recursive: true });
    const sentinel = { [SECRET_KEYS.jobToken]: 'SENTINEL-token-4f1c', [SECRET_KEYS.natsUser]: 'SENTINEL-user-9a7e', [SECRET_KEYS.natsPassword]: 'SENTINEL-password-2d3b' };
    fs.writeFileSync(path.join(tmp, 'k8s/base/secrets.env'), Object.entries(sentinel).map(([k, v]) => `${k}=${v}`).join('\n') + '\n');
    for (const ov of OVERLAYS) {
      const r = spawnSync('kubectl', ['kustomize', path.join(tmp, 'k8s/overlays', ov)], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
      // The secret values appear in the Secret only (base64), never in clear text anywhere.
      for (const v of Object.values(sentinel)) assert.ok(!r.stdout.includes(v), `${ov}: ${v} not in clear text`);
      const docs = parseAllDocuments(r.stdout).map((d) => d.toJS() as K8sObject);
      const secret = docs.find((d) => d.kind === 'Secret')!;
      for (const [k, v] of Object.entries(sentinel)) assert.equal(Buffer.from((secret.data as Record<string, string>)[k], 'base64').toString(), v);
      // Generated names carry a content hash; everything else must match the generator's rendering.
      const unhash = (s: string) => s.replace(new RegExp(`^(${n.job}|${n.secrets})-[a-z0-9]{10}$`), '$1');
      const normalise = (o: unknown): unknown => {
        if (Array.isArray(o)) return o.map(normalise);
        if (o && typeof o === 'object') return Object.fromEntries(Object.entries(o).map(([k, v]) => [k, typeof v === 'string' ? unhash(v) : normalise(v)]));
        return o;
      };
      const key = (o: K8sObject) => `${o.kind}/${o.metadata.name}`;
      const got = new Map(docs.map((d) => normalise(d) as K8sObject).map((d) => [key(d), d]));
      const want = new Map(rendered.get(ov)!.map((d) => [key(d), d]));
      assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), `${ov}: same objects`);
      for (const [k, w] of want) {
        if (w.kind === 'Secret') continue; // values compared above
        assert.deepEqual(got.get(k), w, `${ov}: ${k}`);
      }
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});
