// Every generated file of deploy/, as relative path → contents. scripts/gen-deploy.ts writes them; the drift
// test regenerates them into a temp dir and compares with the committed ones.
import { stringify } from 'yaml';
import { defaultDeployConfig, type DeployConfig } from './config.ts';
import { GENERATED_HEADER, buildK8s } from './k8s.ts';
import { alertGroups } from './alerts.ts';
import { dashboardJson } from '../grafana/dashboard.ts';

export function generateDeploy(c: DeployConfig = defaultDeployConfig): Map<string, string> {
  const out = new Map<string, string>();
  for (const [p, text] of buildK8s(c).files) out.set(`k8s/${p}`, text);
  out.set('prometheus/alerts.yml', GENERATED_HEADER + stringify({ groups: alertGroups(c) }, { lineWidth: 0 }));
  out.set('grafana/dqlora-dashboard.json', dashboardJson());
  return out;
}
