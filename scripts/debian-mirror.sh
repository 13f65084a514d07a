#!/bin/sh
# Print the Debian mirror this machine's apt is configured with for SUITE (default bookworm), e.g.
# http://deb.debian.org/debian/: debootstrap then fetches from where apt already does, and no
# mirror host is written into the scripts. Exit 1 with a message when apt has no such source.
set -eu
SUITE=${1:-bookworm}
mirror=$(apt-get indextargets --format '$(REPO_URI)' "Release: $SUITE" 'Identifier: Packages' 2>/dev/null | head -n 1)
if [ -z "$mirror" ]; then
  echo "debian-mirror.sh: apt has no source for Debian $SUITE (see /etc/apt/sources.list*): set MIRROR" >&2
  exit 1
fi
echo "$mirror"
