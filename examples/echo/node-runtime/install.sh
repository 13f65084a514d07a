#!/bin/sh
# Install aws-lambda-ric (AWS's Node.js Runtime Interface Client) into ./node_modules.
# It builds a native addon: its install scripts compile curl and aws-lambda-cpp from the sources
# in the package (autoconf, automake, libtool, cmake, make, g++), then node-gyp builds the addon
# against Node.js's headers. node-gyp would download those headers; where Debian's nodejs package
# put them in /usr/include/node, npm_config_nodedir=/usr makes it use them instead.
set -eu
cd "$(dirname "$0")"
missing=""
for tool in autoconf automake libtool cmake make g++; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq autoconf automake libtool cmake make g++ >/dev/null
  else
    echo "install.sh: needs$missing (e.g. apt-get install autoconf automake libtool cmake make g++)" >&2
    exit 1
  fi
fi
if [ -z "${npm_config_nodedir:-}" ] && [ -f /usr/include/node/node_version.h ]; then
  export npm_config_nodedir=/usr
fi
npm ci --no-audit --no-fund
test -f node_modules/aws-lambda-ric/dist/rapid-client.node
