#!/bin/sh
# Install the Debian packages danlu's built-in datasets come from, if they are missing.
# As root with apt-get: install them (apt-get update once). Otherwise: say how to get them.
missing=""
for p in "$@"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian packages:$missing"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null \
    || { echo "apt-get could not install:$missing"; exit 1; }
else
  echo "note: Debian packages$missing are not installed. Install them with"
  echo "  sudo apt-get install$missing"
  echo "or let danlu download the datasets from their public URLs on first use."
fi
