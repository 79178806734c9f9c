#!/usr/bin/env bash
# Build the poft-ds image and smoke-test it: `poft-ds --version` (with this checkout's commit), the
# prebuilt DeepSpeed ops, and `poft-ds validate` of the quickstart spec on assets built inside the
# container as the image's non-root user. Needs a Docker daemon and network access for the build.
#   bash docker/check_image.sh [TAG]        # default tag poft-ds:check
#   DOCKER_BUILD_ARGS="--build-arg BASE_DIGEST=sha256:..." bash docker/check_image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-poft-ds:check}

fail() { echo "check_image: $*" >&2; exit 1; }
command -v docker >/dev/null 2>&1 || fail "no docker CLI on this machine; nothing was built"
docker info >/dev/null 2>&1 || fail "no Docker daemon reachable ('docker info' fails); nothing was built"

commit=$(git rev-parse HEAD 2>/dev/null || true)
if [ -n "$commit" ] && ! git diff --quiet HEAD 2>/dev/null; then
  commit="$commit-dirty"
fi
echo "[check_image] building $image (commit ${commit:-unknown})"
# shellcheck disable=SC2086  # DOCKER_BUILD_ARGS holds several words on purpose
docker build -f docker/Dockerfile --build-arg GIT_COMMIT="$commit" ${DOCKER_BUILD_ARGS:-} -t "$image" .

version=$(docker run --rm "$image" --version) || fail "'poft-ds --version' failed in $image"
[[ "$version" == "poft-ds "* ]] || fail "'poft-ds --version' printed '$version'"
if [ -n "$commit" ] && [[ "$version" != *"(git ${commit:0:12}"* ]]; then
  fail "'poft-ds --version' printed '$version', not this checkout's commit ${commit:0:12}"
fi
echo "[check_image] $version"

[ "$(docker run --rm --entrypoint id "$image" -u)" != 0 ] || fail "$image runs as root"

docker run --rm --entrypoint python "$image" -c "
from deepspeed.git_version_info import installed_ops
missing = [op for op in ('cpu_adam', 'fused_adam') if not installed_ops.get(op)]
assert not missing, f'DeepSpeed ops not prebuilt: {missing}'
" || fail "the prebuilt DeepSpeed ops are missing in $image"
echo "[check_image] DeepSpeed cpu_adam and fused_adam prebuilt"

# The quickstart's run_dir is ../../runs/quickstart: copied under /workspace it lands in the
# user's writable /workspace/runs. Its default DeepSpeed configs come from the shipped ds_configs/.
docker run --rm --entrypoint bash "$image" -c '
set -euo pipefail
mkdir -p /workspace/examples
cp -r /opt/poft-ds/examples/quickstart /workspace/examples/
python /workspace/examples/quickstart/build_assets.py >/dev/null
poft-ds validate /workspace/examples/quickstart/job.yaml >/dev/null
' || fail "'poft-ds validate' of the quickstart spec failed in $image"
echo "[check_image] ok: $image builds, reports its version, runs as non-root and validates the quickstart spec"
