// The NATS server config the manifests ship (ConfigMap dqlora-nats-config), run by a real nats-server with the
// credentials in its environment as the Secret provides them: clients must authenticate, may use the all-reduce
// subjects only, and max_payload / the /healthz probe path are as the manifests assume.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connect } from '@nats-io/transport-node';
import { buildK8s } from '../../deploy/gen/k8s.ts';
import { defaultDeployConfig as cfg, names } from '../../deploy/gen/config.ts';
import { natsServerMissing, startNatsWithConfig } from '../helpers/nats.ts';

test('the shipped NATS config requires the Secret\'s credentials and limits them to the dqlora subjects', { skip: natsServerMissing() }, async () => {
  const objs = buildK8s(cfg).rendered.get('gpu')!;
  const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === names(cfg).natsConfig)!;
  const conf = (cm.data as Record<string, string>)['nats.conf'];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-nats-conf-'));
  fs.writeFileSync(path.join(dir, 'nats.conf'), conf);
  const user = 'dqlora', pass = 'pw-7c1e/with:odd"chars';
  const server = await startNatsWithConfig(path.join(dir, 'nats.conf'), { NATS_USER: user, NATS_PASSWORD: pass });
  try {
    const url = server.url, mon = server.monitorPort;

    // The readiness/liveness probe path.
    const health = await fetch(`http://127.0.0.1:${mon}/healthz`);
    assert.equal(health.status, 200);

    // Without credentials, or with the wrong password: refused.
    await assert.rejects(connect({ servers: url, timeout: 3000, reconnect: false }), /Authorization Violation/i);
    await assert.rejects(connect({ servers: url, user, pass: 'wrong', timeout: 3000, reconnect: false }), /Authorization Violation/i);

    // With them: an all-reduce subject round-trips, max_payload is the configured one.
    const nc = await connect({ servers: url, user, pass, timeout: 3000, reconnect: false });
    try {
      assert.equal(nc.info?.max_payload, cfg.nats.maxPayloadBytes);
      const sub = nc.subscribe('dqlora.job-1.ar.0.>', { max: 1 });
      const payload = new Uint8Array(64 * 1024).map((_, i) => i & 0xff);
      nc.publish('dqlora.job-1.ar.0.rs.3', payload);
      for await (const m of sub) assert.deepEqual(m.data, payload);
      // Any other subject is outside the account's permissions.
      const other = nc.subscribe('other.>');
      await assert.rejects((async () => { for await (const _ of other) { /* nothing arrives */ } })(), /Permissions Violation/i);
    } finally {
      await nc.close();
    }
  } finally {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
