// Container-aware sizing: the CPU quota and memory limit of a pod's cgroup, read from real files laid out as the
// kernel shows them (cgroup v2 in a pod with its own cgroup namespace, v2 without one, v1 with host paths).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { cpuThreads, freeMemoryBytes, readContainerLimits, totalMemoryBytes } from '../../common/container.ts';

const GiB = 2 ** 30;

function tree(files: Record<string, string>): string {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-cgroup-'));
  for (const [p, text] of Object.entries(files)) {
    fs.mkdirSync(path.join(root, path.dirname(p)), { recursive: true });
    fs.writeFileSync(path.join(root, p), text);
  }
  return root;
}

const V2_MOUNTINFO = '30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n';

test('cgroup v2 in a pod (own cgroup namespace): 2.5 CPUs → 3 threads, 8 GiB limit minus the working set', () => {
  const root = tree({
    'proc/self/cgroup': '0::/\n',
    'proc/self/mountinfo': V2_MOUNTINFO,
    'sys/fs/cgroup/cpu.max': '250000 100000\n',
    'sys/fs/cgroup/memory.max': `${8 * GiB}\n`,
    'sys/fs/cgroup/memory.current': `${3 * GiB}\n`,
    'sys/fs/cgroup/memory.stat': `anon 1000\nfile 2000\ninactive_file ${1 * GiB}\nactive_file 5\n`,
  });
  const l = readContainerLimits({ root });
  assert.deepEqual(l, { source: 'cgroup2', cpuQuota: 2.5, memoryLimitBytes: 8 * GiB, memoryWorkingSetBytes: 2 * GiB });
  assert.equal(cpuThreads(l, 64), 3);
  assert.equal(cpuThreads(l, 2), 2, 'the affinity mask caps it too');
  assert.equal(freeMemoryBytes({ limits: l, hostFree: 400 * GiB }), 6 * GiB);
  assert.equal(freeMemoryBytes({ limits: l, hostFree: 1 * GiB }), 1 * GiB, 'a full node caps it');
  assert.equal(totalMemoryBytes(l), Math.min(os.totalmem(), 8 * GiB));
});

test('cgroup v2 without a namespace: the smallest limit on the path from the process up to the root wins', () => {
  const pod = 'sys/fs/cgroup/kubepods.slice/pod1';
  const root = tree({
    'proc/self/cgroup': '0::/kubepods.slice/pod1/ctr\n',
    'proc/self/mountinfo': V2_MOUNTINFO,
    'sys/fs/cgroup/kubepods.slice/cpu.max': 'max 100000\n',
    [`${pod}/cpu.max`]: '400000 100000\n',          // pod: 4 CPUs
    [`${pod}/ctr/cpu.max`]: 'max 100000\n',         // container: none of its own
    [`${pod}/memory.max`]: `${16 * GiB}\n`,
    [`${pod}/ctr/memory.max`]: `${4 * GiB}\n`,
    [`${pod}/ctr/memory.current`]: `${1 * GiB}\n`,
  });
  const l = readContainerLimits({ root });
  assert.equal(l.cpuQuota, 4);
  assert.equal(l.memoryLimitBytes, 4 * GiB);
  assert.equal(l.memoryWorkingSetBytes, 1 * GiB, 'no memory.stat: the whole usage counts');
  assert.equal(cpuThreads(l, 64), 4);
});

test('cgroup v1 (host paths outside the mount root, "unlimited" as 2^63): quota and limit from the mount point', () => {
  const root = tree({
    'proc/self/cgroup': '12:memory:/kubepods/burstable/pod9/abc\n4:cpu,cpuacct:/kubepods/burstable/pod9/abc\n1:name=systemd:/x\n',
    'proc/self/mountinfo': [
      '25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755',
      '31 25 0:27 /kubepods/burstable/pod9/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct',
      '35 25 0:31 /kubepods/burstable/pod9/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory',
      '41 25 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw',
    ].join('\n') + '\n',
    'sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us': '150000\n',
    'sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us': '100000\n',
    'sys/fs/cgroup/memory/memory.limit_in_bytes': `${2 * GiB}\n`,
    'sys/fs/cgroup/memory/memory.usage_in_bytes': `${1.5 * GiB}\n`,
    'sys/fs/cgroup/memory/memory.stat': `cache 5\ntotal_inactive_file ${0.5 * GiB}\n`,
  });
  const l = readContainerLimits({ root });
  assert.deepEqual(l, { source: 'cgroup1', cpuQuota: 1.5, memoryLimitBytes: 2 * GiB, memoryWorkingSetBytes: 1 * GiB });
  assert.equal(cpuThreads(l, 16), 2);
  assert.equal(freeMemoryBytes({ limits: l, hostFree: 100 * GiB }), 1 * GiB);

  const unlimited = tree({
    'proc/self/cgroup': '4:memory:/\n3:cpu:/\n',
    'proc/self/mountinfo': '35 25 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n32 25 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n',
    'sys/fs/cgroup/memory/memory.limit_in_bytes': '9223372036854771712\n',
    'sys/fs/cgroup/cpu/cpu.cfs_quota_us': '-1\n',
    'sys/fs/cgroup/cpu/cpu.cfs_period_us': '100000\n',
  });
  const u = readContainerLimits({ root: unlimited });
  assert.equal(u.cpuQuota, null);
  assert.equal(u.memoryLimitBytes, null);
  assert.equal(cpuThreads(u, 8), 8);
  assert.equal(freeMemoryBytes({ limits: u, hostFree: 7 * GiB }), 7 * GiB);
});

test('no cgroup filesystem (or unreadable files): no limits, sizing falls back to the machine', () => {
  const l = readContainerLimits({ root: tree({ 'proc/self/cgroup': '', 'proc/self/mountinfo': '' }) });
  assert.deepEqual(l, { source: 'none', cpuQuota: null, memoryLimitBytes: null, memoryWorkingSetBytes: null });
  assert.equal(cpuThreads(l, 6), 6);
  // A garbled cpu.max is "no limit", not NaN threads.
  const g = readContainerLimits({ root: tree({ 'proc/self/cgroup': '0::/\n', 'proc/self/mountinfo': V2_MOUNTINFO, 'sys/fs/cgroup/cpu.max': 'garbage\n' }) });
  assert.equal(g.cpuQuota, null);
});

test('this machine: the real /proc and /sys read without error, threads within the affinity mask', { skip: process.platform !== 'linux' && 'not Linux' }, () => {
  const l = readContainerLimits();
  assert.ok(['cgroup2', 'cgroup1', 'none'].includes(l.source));
  const n = cpuThreads(l);
  assert.ok(n >= 1 && n <= os.availableParallelism());
  const free = freeMemoryBytes({ limits: l });
  assert.ok(free >= 0 && free <= os.freemem() + 1);
});
