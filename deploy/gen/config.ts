// What the generated deployment is made of: names, ports, images, sizes, and the runtime flags it passes.
// One plain object; scripts/gen-deploy.ts renders it into deploy/k8s/**, deploy/prometheus/alerts.yml and
// deploy/grafana/dqlora-dashboard.json. Change a value here, re-run the generator, commit both.
//
// Runtime contract (what the processes are assumed to accept; see deploy/README.md "Runtime assumptions"):
//   coordinator: `node bin/coordinator.js start -c FILE --no-progress`, job token from $DQLORA_JOB_TOKEN, control
//                service address and metrics port from job.yaml (distributed.listen, distributed.metrics_port)
//   worker:      `node bin/worker.js start --coordinator HOST:PORT --device D --listen HOST:PORT --advertise HOST:PORT
//                --metrics-port P`, job token from $DQLORA_JOB_TOKEN
//   both:        /healthz (alive), /readyz (worker: a stage loaded) and /metrics on the metrics port, bound to $DQLORA_METRICS_HOST
//   worker:      NATS user/password from $DQLORA_NATS_USER / $DQLORA_NATS_PASSWORD
//   both (mTLS): PEM files from $DQLORA_TLS_CA / $DQLORA_TLS_CERT / $DQLORA_TLS_KEY
//   worker (mTLS): NATS TLS from $DQLORA_NATS_TLS_CA/_CERT/_KEY (common/nats-options.ts)
//   coordinator: exit 0 done, 1 failed for good, 75 stopped by a signal after a checkpoint (coordinator/lifecycle.ts)
//   worker:      exit 0 job finished, 75 lost its coordinator (rejoin), other = failed

/** Kubernetes resource quantities of one container. */
export interface Resources {
  readonly requests: Record<string, string>;
  readonly limits: Record<string, string>;
}

/** One kustomize overlay: a device flavour of the workers plus the job it runs. */
export interface OverlayConfig {
  /** Directory name under deploy/k8s/overlays. */
  readonly name: 'cpu' | 'gpu';
  /** `worker start --device`. */
  readonly device: 'cpu' | 'cuda';
  /** Pipeline stages (distributed.stages). */
  readonly stages: number;
  /** Data-parallel replicas per stage (distributed.replicas). Worker Job completions = parallelism = stages × replicas. */
  readonly replicas: number;
  /** Image of the workers (kustomize `images` name → newName:newTag). */
  readonly workerImage: string;
  readonly workerResources: Resources;
  /** Node selector and tolerations of the worker pods (GPU nodes). */
  readonly nodeSelector?: Record<string, string>;
  readonly tolerations?: readonly { key: string; operator: 'Exists' | 'Equal'; value?: string; effect: 'NoSchedule' | 'NoExecute' | 'PreferNoSchedule' }[];
  /** Training knobs that differ by device. */
  readonly microBatchSize: number;
  readonly gradAccum: number;
}

export interface DeployConfig {
  readonly namespace: string;
  /** The dqlora job name (job.yaml `name`): also the Prometheus `job` label of every dqlora series. */
  readonly jobName: string;
  /** Prefix of every object name. */
  readonly prefix: string;
  /** Registry/repository the images are pushed to, and the tag (kustomize `images`). */
  readonly registry: string;
  readonly tag: string;
  /**
   * Pin images by digest (`sha256:…`, from `docker push` / `crane digest`): kustomize `images` then uses
   * `digest:` instead of the tag, so a re-pushed tag never changes what runs. Empty = tags.
   */
  readonly imageDigests: { readonly coordinator?: string; readonly workerCpu?: string; readonly workerCuda?: string; readonly nats?: string };
  /** Namespace Prometheus runs in: the only one allowed to reach the metrics ports (NetworkPolicy). */
  readonly monitoringNamespace: string;
  /**
   * Stopping: SIGTERM → the coordinator checkpoints within stopGraceSeconds (DQLORA_STOP_GRACE_S) and exits 75;
   * the kubelet SIGKILLs after terminationGraceSeconds, so keep it above. After the end the coordinator serves its
   * final metrics for lingerSeconds (DQLORA_METRICS_LINGER_S: a few scrape intervals) before exiting.
   */
  readonly lifecycle: { readonly stopGraceSeconds: number; readonly terminationGraceSeconds: number; readonly lingerSeconds: number };
  readonly ports: {
    readonly control: number;
    readonly coordinatorMetrics: number;
    readonly pipeline: number;
    readonly workerMetrics: number;
    readonly nats: number;
    readonly natsMonitor: number;
  };
  /** Labels Prometheus Operator selects ServiceMonitor / PodMonitor / PrometheusRule by (kube-prometheus-stack: release). */
  readonly monitoringLabels: Record<string, string>;
  readonly nats: { readonly image: string; readonly maxPayloadBytes: number; readonly resources: Resources };
  readonly coordinatorResources: Resources;
  /**
   * storageClassName: a class offering the access mode (NFS, CephFS, EFS, Filestore, Azure Files…); null = the
   * cluster's default class (often ReadWriteOnce only: the claims would stay Pending).
   */
  readonly storage: {
    /** Base model + datasets, written once by the user, read by every pod (ReadOnlyMany). */
    readonly models: { readonly size: string; readonly storageClassName: string | null };
    /** Checkpoints and the final adapter: written by the coordinator, read by workers on resume (ReadWriteMany). */
    readonly outputs: { readonly size: string; readonly storageClassName: string | null };
  };
  /** Paths inside the models volume (mounted at /models). */
  readonly modelPath: string;
  readonly trainPath: string;
  readonly validationPath: string;
  readonly uid: number;
  /** Alert thresholds. */
  readonly alerts: {
    readonly noProgressMinutes: number;
    readonly stepRegressionFactor: number;
    readonly checkpointStaleHours: number;
    /** A worker whose step has not changed for this long while the job's steps advance is lagging. */
    readonly lagMinutes: number;
    /** Bubble above the layout's theoretical (p−1)/(m+p−1) by more than this fraction of step time. */
    readonly bubbleExcess: number;
  };
  readonly overlays: readonly OverlayConfig[];
}

export const MOUNTS = {
  models: '/models',
  outputs: '/outputs',
  job: '/etc/dqlora/job',
  tls: '/etc/dqlora/tls',
  tmp: '/tmp',
} as const;

/** Secret keys (the user fills them in deploy/k8s/base/secrets.env; see secrets.env.example). */
export const SECRET_KEYS = { jobToken: 'job-token', natsUser: 'nats-user', natsPassword: 'nats-password' } as const;

/** Environment variable names the processes read (see the runtime contract above). */
export const ENV = {
  jobToken: 'DQLORA_JOB_TOKEN',
  metricsHost: 'DQLORA_METRICS_HOST',
  natsUser: 'DQLORA_NATS_USER',
  natsPassword: 'DQLORA_NATS_PASSWORD',
  tlsCa: 'DQLORA_TLS_CA',
  tlsCert: 'DQLORA_TLS_CERT',
  tlsKey: 'DQLORA_TLS_KEY',
  natsTlsCa: 'DQLORA_NATS_TLS_CA',
  natsTlsCert: 'DQLORA_NATS_TLS_CERT',
  natsTlsKey: 'DQLORA_NATS_TLS_KEY',
  stopGrace: 'DQLORA_STOP_GRACE_S',
  linger: 'DQLORA_METRICS_LINGER_S',
} as const;

export const defaultDeployConfig: DeployConfig = {
  namespace: 'dqlora',
  jobName: 'dqlora-finetune',
  prefix: 'dqlora',
  registry: 'registry.example.com/dqlora',
  tag: '0.1.0',
  imageDigests: {},
  monitoringNamespace: 'monitoring',
  lifecycle: { stopGraceSeconds: 75, terminationGraceSeconds: 90, lingerSeconds: 45 },
  ports: { control: 50051, coordinatorMetrics: 9400, pipeline: 50052, workerMetrics: 9401, nats: 4222, natsMonitor: 8222 },
  monitoringLabels: { release: 'kube-prometheus-stack' },
  nats: {
    // A fixed release, never a floating `2.10-alpine`; `imageDigests.nats` pins it further.
    image: 'nats:2.10.22-alpine',
    // The all-reduce chunks its messages under max_payload; 8 MiB keeps the per-message overhead small.
    maxPayloadBytes: 8 * 1024 * 1024,
    resources: { requests: { cpu: '250m', memory: '256Mi' }, limits: { cpu: '2', memory: '1Gi' } },
  },
  // The coordinator holds no model tensors: tokenised dataset, plan, checkpoint assembly (LoRA + optimizer state).
  coordinatorResources: { requests: { cpu: '1', memory: '2Gi' }, limits: { cpu: '2', memory: '8Gi' } },
  storage: { models: { size: '100Gi', storageClassName: null }, outputs: { size: '50Gi', storageClassName: null } },
  modelPath: '/models/base',
  trainPath: '/models/data/train.jsonl',
  validationPath: '/models/data/validation.jsonl',
  uid: 1000,
  alerts: { noProgressMinutes: 15, stepRegressionFactor: 1.5, checkpointStaleHours: 2, lagMinutes: 10, bubbleExcess: 0.15 },
  overlays: [
    {
      name: 'cpu', device: 'cpu', stages: 2, replicas: 1, workerImage: 'dqlora-worker',
      // Limits equal requests: a Guaranteed pod keeps its cores (the native kernels size their thread pool to them).
      workerResources: { requests: { cpu: '4', memory: '8Gi' }, limits: { cpu: '4', memory: '8Gi' } },
      microBatchSize: 4, gradAccum: 4,
    },
    {
      name: 'gpu', device: 'cuda', stages: 2, replicas: 2, workerImage: 'dqlora-worker-cuda',
      workerResources: {
        requests: { cpu: '4', memory: '32Gi', 'nvidia.com/gpu': '1' },
        limits: { cpu: '8', memory: '64Gi', 'nvidia.com/gpu': '1' },
      },
      nodeSelector: { 'nvidia.com/gpu.present': 'true' },
      tolerations: [{ key: 'nvidia.com/gpu', operator: 'Exists', effect: 'NoSchedule' }],
      microBatchSize: 8, gradAccum: 4,
    },
  ],
};

/** Object names, derived once so every reference agrees. */
export function names(c: DeployConfig) {
  return {
    namespace: c.namespace,
    coordinator: `${c.prefix}-coordinator`,
    worker: `${c.prefix}-worker`,
    nats: `${c.prefix}-nats`,
    natsConfig: `${c.prefix}-nats-config`,
    job: `${c.prefix}-job`,
    secrets: `${c.prefix}-secrets`,
    models: `${c.prefix}-models`,
    outputs: `${c.prefix}-outputs`,
    alerts: `${c.prefix}-alerts`,
    tls: { ca: `${c.prefix}-ca`, selfSigned: `${c.prefix}-selfsigned`, coordinator: `${c.prefix}-coordinator-tls`, worker: `${c.prefix}-worker-tls`, nats: `${c.prefix}-nats-tls` },
  } as const;
}
