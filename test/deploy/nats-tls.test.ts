// The mtls overlay's NATS: the ConfigMap's TLS config run by a real nats-server with certificates from a test CA
// (openssl), and a worker's connect options from its environment (common/nats-options.ts) as the manifests set
// it: with the CA and its own certificate it round-trips an all-reduce subject; in plaintext, or without a client
// certificate, it is refused.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connect } from '@nats-io/transport-node';
import { buildK8s } from '../../deploy/gen/k8s.ts';
import { defaultDeployConfig as cfg, names, ENV, MOUNTS } from '../../deploy/gen/config.ts';
import { natsConnectOptions } from '../../common/nats-options.ts';
import { natsServerMissing, startNatsWithConfig } from '../helpers/nats.ts';

const opensslMissing = spawnSync('openssl', ['version'], { stdio: 'ignore' }).error ? 'openssl is not installed' : undefined;

function openssl(dir: string, ...args: string[]): void {
  const r = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' });
  assert.equal(r.status, 0, `openssl ${args.join(' ')}\n${r.stderr}`);
}

/** A CA, a server certificate for 127.0.0.1 and a client certificate, as cert-manager would issue them. */
function makeCerts(dir: string): void {
  openssl(dir, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=dqlora-ca');
  for (const [name, san] of [['server', 'IP:127.0.0.1,DNS:localhost'], ['client', 'DNS:dqlora-worker-0.dqlora-worker.dqlora.svc']]) {
    openssl(dir, 'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    fs.writeFileSync(path.join(dir, `${name}.ext`), `subjectAltName=${san}\nextendedKeyUsage=serverAuth,clientAuth\n`);
    openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.crt`, '-days', '2', '-extfile', `${name}.ext`);
  }
}

test('mtls overlay: NATS requires TLS and a client certificate; a worker with the manifests\' environment connects', { skip: natsServerMissing() || opensslMissing, timeout: 60_000 }, async () => {
  const objs = buildK8s(cfg).rendered.get('mtls')!;
  const conf = ((objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === names(cfg).natsConfig)!.data) as Record<string, string>)['nats.conf'];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-nats-tls-'));
  makeCerts(dir);
  // The server's files where the pod mounts its Secret: only the mount path moves.
  fs.mkdirSync(path.join(dir, 'server-tls'));
  for (const [from, to] of [['ca.crt', 'ca.crt'], ['server.crt', 'tls.crt'], ['server.key', 'tls.key']]) fs.copyFileSync(path.join(dir, from), path.join(dir, 'server-tls', to));
  fs.writeFileSync(path.join(dir, 'nats.conf'), conf.replaceAll(MOUNTS.tls, path.join(dir, 'server-tls')));
  const user = 'dqlora', pass = 'tls-test-password';
  const server = await startNatsWithConfig(path.join(dir, 'nats.conf'), { NATS_USER: user, NATS_PASSWORD: pass });
  try {
    const url = server.url;
    // The worker's environment as the mtls component sets it (paths moved to the test's files).
    const workerEnv = {
      DQLORA_NATS_USER: user, DQLORA_NATS_PASSWORD: pass,
      [ENV.natsTlsCa]: path.join(dir, 'ca.crt'), [ENV.natsTlsCert]: path.join(dir, 'client.crt'), [ENV.natsTlsKey]: path.join(dir, 'client.key'),
    };
    const opts = natsConnectOptions(workerEnv);
    assert.deepEqual(opts.tls, { caFile: workerEnv[ENV.natsTlsCa], certFile: workerEnv[ENV.natsTlsCert], keyFile: workerEnv[ENV.natsTlsKey] });
    const nc = await connect({ servers: url, timeout: 5000, reconnect: false, ...opts });
    try {
      assert.equal(nc.info?.tls_required, true);
      const sub = nc.subscribe('dqlora.job-1.ar.1.>', { max: 1 });
      const payload = new Uint8Array(4096).map((_, i) => (i * 7) & 0xff);
      nc.publish('dqlora.job-1.ar.1.ag.0', payload);
      for await (const m of sub) assert.deepEqual(m.data, payload);
    } finally {
      await nc.close();
    }
    // Plaintext, or TLS without a client certificate: refused.
    await assert.rejects(connect({ servers: url, user, pass, timeout: 3000, reconnect: false }));
    await assert.rejects(connect({ servers: url, user, pass, timeout: 3000, reconnect: false, tls: { caFile: workerEnv[ENV.natsTlsCa] } }));
  } finally {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('NATS options from the environment: half a setting is an error naming both variables, a missing file names its path', () => {
  assert.deepEqual(natsConnectOptions({}), {});
  assert.deepEqual(natsConnectOptions({ DQLORA_NATS_USER: 'u', DQLORA_NATS_PASSWORD: 'p' }), { user: 'u', pass: 'p' });
  assert.throws(() => natsConnectOptions({ DQLORA_NATS_USER: 'u' }), /DQLORA_NATS_USER is set but DQLORA_NATS_PASSWORD is not/);
  assert.throws(() => natsConnectOptions({ DQLORA_NATS_TLS_CERT: '/x' }), /DQLORA_NATS_TLS_CERT and DQLORA_NATS_TLS_KEY go together/);
  assert.throws(() => natsConnectOptions({ DQLORA_NATS_TLS_CA: '/nonexistent/ca.crt' }), /DQLORA_NATS_TLS_CA: \/nonexistent\/ca.crt does not exist/);
});
