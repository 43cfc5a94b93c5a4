// How a worker authenticates to NATS, from its environment (a Kubernetes Secret and the mtls component's mounted
// certificate), never from the job file or a URL:
//   DQLORA_NATS_USER / DQLORA_NATS_PASSWORD                       user and password (both or neither)
//   DQLORA_NATS_TLS_CA / DQLORA_NATS_TLS_CERT / DQLORA_NATS_TLS_KEY  TLS: the CA that signed the server's
//                                                                 certificate, and this client's certificate + key
//                                                                 (cert and key both or neither; CA alone = server
//                                                                 authentication only)
// Spread the result into nats.js `connect({ servers, ...natsConnectOptions() })`.
import { existsSync } from 'node:fs';
import { ConfigError } from './errors.ts';

export interface NatsAuthOptions {
  user?: string;
  pass?: string;
  tls?: { caFile?: string; certFile?: string; keyFile?: string };
}

export function natsConnectOptions(env: NodeJS.ProcessEnv = process.env): NatsAuthOptions {
  const v = (k: string) => env[k]?.trim() || undefined;
  const out: NatsAuthOptions = {};
  const user = v('DQLORA_NATS_USER'), pass = v('DQLORA_NATS_PASSWORD');
  if ((user === undefined) !== (pass === undefined)) {
    throw new ConfigError(`${user ? 'DQLORA_NATS_USER is set but DQLORA_NATS_PASSWORD is not' : 'DQLORA_NATS_PASSWORD is set but DQLORA_NATS_USER is not'}`, { hint: 'set both (the nats-user and nats-password keys of the job Secret) or neither' });
  }
  if (user) Object.assign(out, { user, pass });
  const ca = v('DQLORA_NATS_TLS_CA'), cert = v('DQLORA_NATS_TLS_CERT'), key = v('DQLORA_NATS_TLS_KEY');
  if ((cert === undefined) !== (key === undefined)) {
    throw new ConfigError('DQLORA_NATS_TLS_CERT and DQLORA_NATS_TLS_KEY go together: one is set, the other is not', { hint: 'point both at the PEM files of this worker\'s certificate and key' });
  }
  for (const [name, file] of [['DQLORA_NATS_TLS_CA', ca], ['DQLORA_NATS_TLS_CERT', cert], ['DQLORA_NATS_TLS_KEY', key]] as const) {
    if (file !== undefined && !existsSync(file)) throw new ConfigError(`${name}: ${file} does not exist`, { hint: 'in Kubernetes the mtls component mounts them under /etc/dqlora/tls; is the certificate Secret ready?' });
  }
  if (ca || cert) out.tls = { ...(ca ? { caFile: ca } : {}), ...(cert ? { certFile: cert, keyFile: key } : {}) };
  return out;
}
