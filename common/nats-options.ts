// How a worker authenticates to NATS, from its environment (a Kubernetes Secret and the mtls component's mounted
// certificate), never from the job file or a URL:
//   DQLORA_NATS_USER / DQLORA_NATS_PASSWORD                       user and password (both or neither)
//   DQLORA_NATS_TLS_CA / DQLORA_NATS_TLS_CERT / DQLORA_NATS_TLS_KEY  TLS: the CA that signed the server's
//                                                                 certificate, and this client's certificate + key
//                                                                 (cert and key both or neither; CA alone = server
//                                                                 authentication only)
//   DQLORA_NATS_TOKEN                                             a bare token
//   DQLORA_NATS_NKEY_SEED                                         path of a file holding an nkey user seed (SU...)
//   DQLORA_NATS_CREDS                                             path of a .creds file (user JWT + nkey seed, from nsc)
// At most one kind of credentials; an unreadable file or a malformed seed / creds file is a ConfigError before
// any connection attempt.
// Spread the result into nats.js `connect({ servers, ...natsConnectOptions() })`.
import { existsSync, readFileSync } from 'node:fs';
import { credsAuthenticator, nkeyAuthenticator, type Authenticator } from '@nats-io/transport-node';
import { ConfigError } from './errors.ts';

export interface NatsAuthOptions {
  user?: string;
  pass?: string;
  token?: string;
  authenticator?: Authenticator;
  tls?: { caFile?: string; certFile?: string; keyFile?: string };
}

function readSecretFile(name: string, path: string): Uint8Array {
  try { return new Uint8Array(readFileSync(path)); } catch (e) {
    throw new ConfigError(`${name}=${path}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, { hint: `point ${name} at the file (a mounted Secret)` });
  }
}

export function natsConnectOptions(env: NodeJS.ProcessEnv = process.env): NatsAuthOptions {
  const v = (k: string) => env[k]?.trim() || undefined;
  const out: NatsAuthOptions = {};
  const user = v('DQLORA_NATS_USER'), pass = v('DQLORA_NATS_PASSWORD');
  if ((user === undefined) !== (pass === undefined)) {
    throw new ConfigError(`${user ? 'DQLORA_NATS_USER is set but DQLORA_NATS_PASSWORD is not' : 'DQLORA_NATS_PASSWORD is set but DQLORA_NATS_USER is not'}`, { hint: 'set both (the nats-user and nats-password keys of the job Secret) or neither' });
  }
  if (user) Object.assign(out, { user, pass });
  const token = v('DQLORA_NATS_TOKEN'), seedFile = v('DQLORA_NATS_NKEY_SEED'), credsFile = v('DQLORA_NATS_CREDS');
  const kinds = [user && 'DQLORA_NATS_USER/_PASSWORD', token && 'DQLORA_NATS_TOKEN', seedFile && 'DQLORA_NATS_NKEY_SEED', credsFile && 'DQLORA_NATS_CREDS'].filter(Boolean);
  if (kinds.length > 1) throw new ConfigError(`NATS credentials are given more than one way: ${kinds.join(', ')}`, { hint: 'set one kind only' });
  if (token) out.token = token;
  if (seedFile) {
    const seed = new TextDecoder().decode(readSecretFile('DQLORA_NATS_NKEY_SEED', seedFile)).trim();
    if (!/^SU[A-Z2-7]{50,}$/.test(seed)) throw new ConfigError(`DQLORA_NATS_NKEY_SEED=${seedFile}: not an nkey user seed (expected one line starting with SU)`, { hint: 'create one with `nsc` or `nk -gen user`' });
    out.authenticator = nkeyAuthenticator(new TextEncoder().encode(seed));
  }
  if (credsFile) {
    const creds = readSecretFile('DQLORA_NATS_CREDS', credsFile);
    const text = new TextDecoder().decode(creds);
    if (!text.includes('-----BEGIN NATS USER JWT-----') || !text.includes('-----BEGIN USER NKEY SEED-----')) throw new ConfigError(`DQLORA_NATS_CREDS=${credsFile}: not a NATS .creds file (needs a user JWT and a user nkey seed block)`, { hint: 'generate it with `nsc generate creds`' });
    out.authenticator = credsAuthenticator(creds);
  }
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
