// gRPC transport security from the environment: with DQLORA_TLS_CA, DQLORA_TLS_CERT and DQLORA_TLS_KEY set (PEM file
// paths; the Kubernetes mtls overlay mounts cert-manager certificates there), every gRPC server requires and verifies
// client certificates signed by that CA and every client presents its own — mutual TLS, so a process without a valid
// certificate cannot join a job. Without them, loopback/insecure channels (local mode, tests). Half a configuration
// is an error, never a silent fallback to plaintext.
import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
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

/**
 * Whether the server at host:port answers a TLS handshake: true (it speaks TLS — it may still refuse our
 * certificate), false (it answered, but not with TLS), undefined (unreachable or unclear). A client that cannot
 * connect uses it to tell "wrong transport" from "not up yet".
 */
export function serverSpeaksTls(host: string, port: number, timeoutMs = 3000): Promise<boolean | undefined> {
  return new Promise((resolve) => {
    let done = false;
    const finish = (v: boolean | undefined): void => { if (done) return; done = true; clearTimeout(timer); sock.destroy(); resolve(v); };
    const sock = tls.connect({ host, port, rejectUnauthorized: false, ALPNProtocols: ['h2'], servername: net.isIP(host) ? undefined : host });
    const timer = setTimeout(() => finish(undefined), timeoutMs);
    sock.once('secureConnect', () => finish(true));
    sock.once('error', (e: NodeJS.ErrnoException) => {
      const text = `${e.code ?? ''} ${e.message}`;
      if (/alert|certificate|handshake failure/i.test(text)) finish(true); // a TLS server refusing us
      else if (/WRONG_VERSION_NUMBER|packet length too long|http request|unknown protocol|ECONNRESET|socket disconnected|socket hang up/i.test(text)) finish(false);
      else finish(undefined); // ECONNREFUSED, EHOSTUNREACH, ...: not up
    });
  });
}

/**
 * A hint when this process and the gRPC server at `address` disagree about TLS (one of them has
 * DQLORA_TLS_* set, the other not); null when they agree or it cannot be told.
 */
export async function tlsMismatchHint(address: string, env: NodeJS.ProcessEnv = process.env): Promise<string | null> {
  const i = address.lastIndexOf(':');
  const host = address.slice(0, i).replace(/^\[|\]$/g, ''), port = Number(address.slice(i + 1));
  const speaks = await serverSpeaksTls(host, port);
  const ours = tlsEnabled(env);
  if (speaks === true && !ours) return `${address} speaks TLS but this process has no TLS configuration: set DQLORA_TLS_CA, DQLORA_TLS_CERT and DQLORA_TLS_KEY (PEM paths) as on the coordinator`;
  if (speaks === false && ours) return `${address} speaks plaintext but this process is configured for mutual TLS (DQLORA_TLS_*): configure TLS on the server too, or unset DQLORA_TLS_CA, DQLORA_TLS_CERT and DQLORA_TLS_KEY here`;
  return null;
}
