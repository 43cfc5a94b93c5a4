// gRPC transport security from the environment: with DQLORA_TLS_CA, DQLORA_TLS_CERT and DQLORA_TLS_KEY set (PEM file
// paths; the Kubernetes mtls overlay mounts cert-manager certificates there), every gRPC server requires and verifies
// client certificates signed by that CA and every client presents its own — mutual TLS, so a process without a valid
// certificate cannot join a job. Without them, loopback/insecure channels (local mode, tests). Half a configuration
// is an error, never a silent fallback to plaintext.
import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { ConfigError } from './errors.ts';

interface TlsFiles { ca: Buffer; cert: Buffer; key: Buffer }

function tlsFiles(env: NodeJS.ProcessEnv): TlsFiles | null {
  const names = ['DQLORA_TLS_CA', 'DQLORA_TLS_CERT', 'DQLORA_TLS_KEY'] as const;
  const set = names.filter((n) => env[n]?.trim());
  if (set.length === 0) return null;
  if (set.length !== names.length) {
    throw new ConfigError(`TLS is half configured: ${set.join(', ')} set but ${names.filter((n) => !set.includes(n)).join(', ')} missing`, { hint: 'set all three (PEM paths) for mutual TLS, or none for plaintext' });
  }
  const read = (n: (typeof names)[number]): Buffer => {
    try { return readFileSync(env[n]!.trim()); } catch (e) { throw new ConfigError(`${n}=${env[n]}: cannot read (${(e as Error).message})`); }
  };
  return { ca: read('DQLORA_TLS_CA'), cert: read('DQLORA_TLS_CERT'), key: read('DQLORA_TLS_KEY') };
}

/** Whether mutual TLS is configured. */
export function tlsEnabled(env: NodeJS.ProcessEnv = process.env): boolean {
  return tlsFiles(env) !== null;
}

/** Server credentials: mTLS (client certificates required and verified) when configured, else insecure. */
export function serverCredentials(env: NodeJS.ProcessEnv = process.env): grpc.ServerCredentials {
  const f = tlsFiles(env);
  if (!f) return grpc.ServerCredentials.createInsecure();
  return grpc.ServerCredentials.createSsl(f.ca, [{ cert_chain: f.cert, private_key: f.key }], true);
}

/** Client credentials: presents our certificate and verifies the server's against the CA, when configured. */
export function channelCredentials(env: NodeJS.ProcessEnv = process.env): grpc.ChannelCredentials {
  const f = tlsFiles(env);
  if (!f) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(f.ca, f.key, f.cert);
}
