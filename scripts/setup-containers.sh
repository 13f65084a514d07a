#!/usr/bin/env bash
# What the container tests (tests/test_containers.py) and the README's "Containers" section need:
# podman with runc (Debian's packages, installed when missing) and a Debian base image for the
# echo-lambda Dockerfile to build FROM. No image registry is reachable from these machines, so the
# base is a debootstrapped Debian root, imported with `podman import`, from the mirror this
# machine's apt already uses. Both are kept: a second run only checks, in well under a second.
#
#   ./scripts/setup-containers.sh     prints the base image's name on stdout
# Exit status: 0 ready; 77 containers cannot be set up here (not root, or no podman and no apt-get;
# the reason on stderr); anything else: a step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/containers.conf}
SUITE=bookworm
BASE_IMAGE=localhost/lambda-rapid-debian:$SUITE

cannot() {
  echo "setup-containers.sh: containers cannot be set up here: $*" >&2
  exit 77
}

[ "$(id -u)" = 0 ] || cannot "needs root (podman as root, debootstrap)"
missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || cannot "${missing[*]} missing and no apt-get to install them"
  echo "setup-containers.sh: installing podman, runc and debootstrap (Debian packages)" >&2
  started=$SECONDS
  log=$(mktemp /var/tmp/setup-containers-apt.XXXXXX.log)
  # podman-docker: a `docker` command that runs podman (as /usr/bin/docker: another docker may come
  # first on PATH). netavark + iptables: podman's network for -p; no crun (see containers.conf).
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           podman podman-docker runc netavark iptables debootstrap; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "setup-containers.sh: apt-get failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "setup-containers.sh: installed in $((SECONDS - started)) s" >&2
fi

if ! podman image exists "$BASE_IMAGE"; then
  started=$SECONDS
  mirror=${MIRROR:-$(./scripts/debian-mirror.sh "$SUITE")}
  echo "setup-containers.sh: building the base image $BASE_IMAGE (debootstrap $SUITE from $mirror;" \
       "first run only, a few minutes)" >&2
  root=$(mktemp -d /var/tmp/lambda-rapid-debian.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  log=$root.log
  # ca-certificates: configured here, so the build's `-v` of this host's CA bundle over
  # /etc/ssl/certs/ca-certificates.crt (for pip) does not meet its postinst rewriting that file.
  if ! debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$mirror" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "setup-containers.sh: debootstrap failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  # As a registry's base image: no downloaded packages, no package lists (the Dockerfile's
  # apt-get update fetches them).
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  echo "setup-containers.sh: base image $BASE_IMAGE built in $((SECONDS - started)) s" \
       "(kept in podman's storage for later runs)" >&2
fi
echo "$BASE_IMAGE"
