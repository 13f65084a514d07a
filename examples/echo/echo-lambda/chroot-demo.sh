#!/bin/sh
# echo-lambda.sh without Docker: the same bind-mount, into a minimal Debian root filesystem.
#
# debootstrap builds a Debian bookworm root filesystem with python3 and pip (the image's base
# layer); pip installs awslambdaric into it and echo.py and lambda-entrypoint.sh go to /var/task
# (the Dockerfile's layers). Then, in a private mount namespace, bin/lambda-runtime-api-daemon is
# bind-mounted onto /usr/local/bin/aws-lambda-rie (docker run -v) and lambda-entrypoint.sh runs
# chrooted as an unprivileged user (docker run -u), with only the variables echo-lambda.sh sets:
# the function is served on http://localhost:${PORT:-8080}, as by the container. Ctrl-C stops it.
# Unlike a container, the chroot shares this host's network: RUNTIME_API_PORT (default 9001) and
# AMQP_URI are passed on when set.
#
# Needs root, debootstrap (apt-get install debootstrap) and a Debian mirror: MIRROR, by default the
# one this machine's apt uses for bookworm (scripts/debian-mirror.sh). The first run takes a few
# minutes; the root filesystem is kept in $ROOTFS (default /tmp/echo-lambda-rootfs).
#   ./chroot-demo.sh            build if needed, then serve
#   ./chroot-demo.sh --build    build only
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
DAEMON="$HERE/../../../bin/lambda-runtime-api-daemon"
ROOTFS=${ROOTFS:-/tmp/echo-lambda-rootfs}
PORT=${PORT:-8080}
RUN_AS=${RUN_AS:-65534:65534}

if [ "$(id -u)" != 0 ]; then
  echo "chroot-demo.sh: needs root (debootstrap, mount, chroot)" >&2
  exit 1
fi
if [ ! -f "$DAEMON" ]; then
  echo "chroot-demo.sh: $DAEMON is missing: run .venv/bin/python tools/build_zipapp.py first" >&2
  exit 1
fi

if [ ! -f "$ROOTFS/.echo-lambda-ready" ]; then
  if [ -e "$ROOTFS" ]; then
    echo "chroot-demo.sh: $ROOTFS is an unfinished build: remove it (rm -r $ROOTFS) and run again" >&2
    exit 1
  fi
  MIRROR=${MIRROR:-$("$HERE/../../../scripts/debian-mirror.sh" bookworm)}
  # FROM + RUN apt-get install python3 python3-pip
  debootstrap --variant=minbase --include=python3,python3-pip bookworm "$ROOTFS" "$MIRROR"
  # RUN pip3 install awslambdaric (with this host's DNS and CA bundle, for its package proxy)
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt"
  chroot "$ROOTFS" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
    pip3 install --quiet --break-system-packages --no-cache-dir awslambdaric==4.2.2
  touch "$ROOTFS/.echo-lambda-ready"
fi
# COPY echo.py lambda-entrypoint.sh /var/task/ (every run: the example may have changed)
mkdir -p "$ROOTFS/var/task" "$ROOTFS/usr/local/bin"
cp "$HERE/echo.py" "$HERE/lambda-entrypoint.sh" "$ROOTFS/var/task/"
chmod 755 "$ROOTFS/var/task/lambda-entrypoint.sh"
[ "${1:-}" = "--build" ] && exit 0

# docker run -v .../lambda-runtime-api-daemon:/usr/local/bin/aws-lambda-rie -u UID:GID -e ...
# The mounts exist only in this namespace and vanish with it.
touch "$ROOTFS/usr/local/bin/aws-lambda-rie"
export ROOTFS DAEMON PORT RUN_AS
exec unshare --mount --propagation private sh -c '
  mount --bind "$DAEMON" "$ROOTFS/usr/local/bin/aws-lambda-rie"
  mount -t proc proc "$ROOTFS/proc"
  exec chroot --userspec="$RUN_AS" "$ROOTFS" env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \
    AWS_LAMBDA_FUNCTION_NAME=echo-lambda PORT="$PORT" ${AMQP_URI:+AMQP_URI="$AMQP_URI"} \
    ${RUNTIME_API_PORT:+RUNTIME_API_PORT="$RUNTIME_API_PORT"} \
    /bin/sh -c "cd /var/task && exec ./lambda-entrypoint.sh echo.handler"'
