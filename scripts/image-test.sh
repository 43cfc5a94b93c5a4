#!/usr/bin/env bash
# The CPU image, built and run for real without any container registry:
#   1. a Debian base made here with mmdebstrap from Debian packages (plus the Node.js found on this machine,
#      or $DQLORA_IMAGE_NODE_DIR: a Node install prefix with bin/node and lib/node_modules/npm),
#   2. deploy/docker/Dockerfile.cpu built on it with podman (or buildah), targets coordinator and worker,
#   3. inside the coordinator image: `coordinator --help`, `worker --help`, and the built-in example cut to a
#      few steps (writes under $DQLORA_CACHE_DIR, /app being read-only to uid 1000), which must save an adapter.
#
#   scripts/image-test.sh            # needs root (or rootless podman with subuids), mmdebstrap, podman or buildah,
#                                    # and network access to a Debian mirror and the npm registry (npm ci)
# Environment: DQLORA_IMAGE_SUITE (bookworm), DQLORA_IMAGE_MIRROR (http://deb.debian.org/debian),
# DQLORA_IMAGE_KEEP=1 keeps the images afterwards. Exit 77 when the tools are missing (a skip, not a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

suite=${DQLORA_IMAGE_SUITE:-bookworm}
mirror=${DQLORA_IMAGE_MIRROR:-http://deb.debian.org/debian}
tag=dqlora-image-test
t0=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - t0))"; }

for tool in mmdebstrap buildah podman; do
  command -v "$tool" >/dev/null || { echo "image-test: $tool is not installed (apt-get install mmdebstrap buildah podman): skipped"; exit 77; }
done
node_bin=$(command -v node || true)
node_dir=${DQLORA_IMAGE_NODE_DIR:-$(dirname "$(dirname "$(readlink -f "$node_bin")")")}
[ -x "$node_dir/bin/node" ] && [ -d "$node_dir/lib/node_modules/npm" ] && [ -f "$node_dir/include/node/node_api.h" ] \
  || { echo "image-test: no Node.js install with npm and headers (include/node) under $node_dir (set DQLORA_IMAGE_NODE_DIR)"; exit 2; }

# chroot isolation and vfs storage work inside unprivileged CI containers too (no user namespaces, no overlay).
export BUILDAH_ISOLATION=chroot STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  if [ "${DQLORA_IMAGE_KEEP:-0}" != 1 ]; then
    buildah rm --all >/dev/null 2>&1 || true
    buildah rmi "localhost/$tag-coordinator" "localhost/$tag-worker" "localhost/$tag-base" >/dev/null 2>&1 || true
    buildah rmi --prune >/dev/null 2>&1 || true   # the build's intermediate layers (vfs: hundreds of MB each)
  fi
}
trap cleanup EXIT

step "base: Debian $suite via mmdebstrap + Node $("$node_dir/bin/node" --version) from $node_dir"
# What the node:*-bookworm-slim image provides: Debian, node + npm + headers in /usr/local, a `node` user (uid 1000).
# The Dockerfile's own apt-get installs (g++, make, python3; tini) then find them present.
# Site-local CAs of this machine (a TLS-inspecting proxy in front of the npm registry, say) go into the base, as
# a site's own base image would carry them; node reads them through NODE_EXTRA_CA_CERTS.
site_ca=()
base_env=()
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  site_ca=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"'
           --customize-hook='copy-in /usr/local/share/ca-certificates/. /usr/local/share/ca-certificates'
           --customize-hook='chroot "$1" update-ca-certificates')
  base_env=(--change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt')
fi
mmdebstrap --variant=apt --format=tar --include=ca-certificates,g++,make,python3,tini "${site_ca[@]}" \
  --customize-hook="mkdir -p \"\$1/usr/local/bin\" \"\$1/usr/local/lib/node_modules\"" \
  --customize-hook="copy-in $node_dir/bin/node /usr/local/bin" \
  --customize-hook="copy-in $node_dir/lib/node_modules/npm /usr/local/lib/node_modules" \
  --customize-hook="mkdir -p \"\$1/usr/local/include\"" \
  --customize-hook="copy-in $node_dir/include/node /usr/local/include" \
  --customize-hook="chroot \"\$1\" ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm" \
  --customize-hook="chroot \"\$1\" useradd --uid 1000 --create-home --shell /bin/bash node" \
  "$suite" "$work/rootfs.tar" "$mirror"
podman import --change 'CMD ["node"]' "${base_env[@]}" "$work/rootfs.tar" "localhost/$tag-base" >/dev/null

step "context: the files git tracks (what a clean clone has)"
mkdir "$work/ctx"
git ls-files -z --cached --others --exclude-standard | grep -zv '^node_modules$' | tar --null -T - -cf - | tar -xf - -C "$work/ctx"
cp deploy/docker/Dockerfile.cpu.dockerignore "$work/ctx/.dockerignore"

for target in coordinator worker; do
  step "build: Dockerfile.cpu --target $target"
  buildah bud --isolation=chroot --layers --pull-never --build-arg NODE_IMAGE="localhost/$tag-base" \
    -f deploy/docker/Dockerfile.cpu --target "$target" -t "localhost/$tag-$target" "$work/ctx"
done

# `podman run` needs setrlimit and namespaces some sandboxes refuse; `buildah run --isolation=chroot` runs the
# image's user, working directory and environment the same way without them.
run() { # image, command...
  local img=$1; shift
  local ctr
  ctr=$(buildah from --pull-never "localhost/$tag-$img")
  buildah run --isolation=chroot "$ctr" -- "$@"
  local rc=$?
  buildah rm "$ctr" >/dev/null
  return $rc
}

step "run: coordinator --help, worker --help"
run coordinator tini -- node bin/coordinator.js --help | grep -q 'start' || { echo "image-test: coordinator --help printed no commands"; exit 1; }
run worker tini -- node bin/worker.js start --help | grep -q -- '--coordinator' || { echo "image-test: worker start --help lacks --coordinator"; exit 1; }
run worker tini -- node bin/worker.js info --device cpu | tee "$work/info.json" | grep -q '"cpuNativeKernels": "loaded"' \
  || { echo "image-test: the worker image's native CPU kernels do not load"; cat "$work/info.json"; exit 1; }

step "run: the built-in example, 3 steps, as uid 1000 on the image's read-only /app"
run coordinator sh -c 'id -u && ! touch /app/x 2>/dev/null && node bin/coordinator.js start --max-steps 3 --no-progress' | tee "$work/job.log"
grep -q '^1000$' "$work/job.log" || { echo "image-test: not running as uid 1000"; exit 1; }
grep -q 'adapter saved to /tmp/dqlora/runs/example/adapter' "$work/job.log" || { echo "image-test: the example saved no adapter"; exit 1; }

step "image test passed"
