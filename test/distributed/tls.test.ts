// Mutual TLS on every gRPC channel (control and pipeline) when DQLORA_TLS_CA/CERT/KEY are set: a job trains with
// its workers over mTLS, a client without a certificate or with one from another CA cannot register, and half a
// configuration is refused instead of silently running in plaintext.
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { parseJob } from '../../coordinator/job.ts';
import { runJob } from '../../coordinator/run.ts';
import { channelCredentials, serverCredentials, tlsEnabled } from '../../common/tls.ts';
import { ConfigError } from '../../common/errors.ts';
import { ControlClient } from '../../proto/gen/dqlora/v1/control.ts';

const hasOpenssl = spawnSync('openssl', ['version']).status === 0;
const work = mkdtempSync(join(tmpdir(), 'dqlora-tls-'));

/** A CA and a leaf certificate for 127.0.0.1 usable by servers and clients. */
function makePki(name: string): { ca: string; cert: string; key: string } {
  const d = join(work, name);
  const run = (...args: string[]): void => {
    const r = spawnSync('openssl', args, { cwd: work, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
  };
  spawnSync('mkdir', ['-p', d]);
  run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=${name}-ca`, '-keyout', join(d, 'ca.key'), '-out', join(d, 'ca.pem'));
  run('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=dqlora', '-keyout', join(d, 'key.pem'), '-out', join(d, 'leaf.csr'));
  writeFileSync(join(d, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n');
  run('x509', '-req', '-in', join(d, 'leaf.csr'), '-CA', join(d, 'ca.pem'), '-CAkey', join(d, 'ca.key'), '-CAcreateserial', '-days', '2', '-extfile', join(d, 'ext.cnf'), '-out', join(d, 'cert.pem'));
  return { ca: join(d, 'ca.pem'), cert: join(d, 'cert.pem'), key: join(d, 'key.pem') };
}

const saved = { ca: process.env.DQLORA_TLS_CA, cert: process.env.DQLORA_TLS_CERT, key: process.env.DQLORA_TLS_KEY };
after(() => {
  for (const [k, v] of [['DQLORA_TLS_CA', saved.ca], ['DQLORA_TLS_CERT', saved.cert], ['DQLORA_TLS_KEY', saved.key]] as const) {
    if (v === undefined) delete process.env[k]; else process.env[k] = v;
  }
});

test('half a TLS configuration is a ConfigError, none is plaintext', () => {
  assert.equal(tlsEnabled({}), false);
  assert.throws(() => serverCredentials({ DQLORA_TLS_CA: '/x' }), (e: unknown) => e instanceof ConfigError && /DQLORA_TLS_CERT, DQLORA_TLS_KEY missing/.test((e as Error).message));
  assert.throws(() => channelCredentials({ DQLORA_TLS_CA: '/nope', DQLORA_TLS_CERT: '/nope', DQLORA_TLS_KEY: '/nope' }), /DQLORA_TLS_CA=\/nope: cannot read/);
});

test('a 2-stage job trains over mutual TLS; clients without a certificate or with a foreign CA cannot register', { skip: !hasOpenssl && 'openssl is not installed', timeout: 120_000 }, async () => {
  const pki = makePki('good'), other = makePki('other');
  process.env.DQLORA_TLS_CA = pki.ca; process.env.DQLORA_TLS_CERT = pki.cert; process.env.DQLORA_TLS_KEY = pki.key;
  const { model, trainPath } = tinyExampleSetup(work, { shape: { numLayers: 2 } });
  const rejected: string[] = [], accepted: string[] = [];
  const job = parseJob({
    name: 'tls', model, output_dir: join(work, 'run'), backend: 'cpu',
    data: { train: trainPath, max_length: 48 },
    lora: { r: 2, alpha: 4, dropout: 0, target_modules: ['q_proj', 'v_proj'] },
    training: { max_steps: 2, micro_batch_size: 2, grad_accum: 1, lr: 1e-3 },
    distributed: { stages: 2, replicas: 1, workers: 'local', heartbeat_timeout_s: 5, step_timeout_s: 60, wait_timeout_s: 60 },
  }, 'test', work);
  const res = await runJob(job, {
    print: () => {},
    // While the coordinator listens (over mTLS), try to register without a client certificate and with a foreign CA.
    onListening: async (address: string) => {
      for (const [what, creds] of [
        ['plaintext', grpc.credentials.createInsecure()],
        ['foreign CA', grpc.credentials.createSsl(readFileSync(pki.ca), readFileSync(other.key), readFileSync(other.cert))],
        // the control: the job's own certificate gets through, so the server was up for the two above
        ['own certificate', grpc.credentials.createSsl(readFileSync(pki.ca), readFileSync(pki.key), readFileSync(pki.cert))],
      ] as const) {
        const c = new ControlClient(address, creds);
        const err = await new Promise<grpc.ServiceError | null>((res) => c.status({ jobToken: '' }, new grpc.Metadata(), { deadline: Date.now() + 3000 }, (e) => res(e)));
        c.close();
        // A TLS handshake refusal surfaces as UNAVAILABLE; anything else (OK, or the app's own UNAUTHENTICATED for a
        // missing job token) means the channel itself was accepted.
        if (err && err.code === grpc.status.UNAVAILABLE) rejected.push(what); else accepted.push(what);
      }
    },
  } as Parameters<typeof runJob>[1]);
  assert.equal(res.steps, 2);
  assert.deepEqual(rejected, ['plaintext', 'foreign CA']);
  assert.deepEqual(accepted, ['own certificate']);
});
