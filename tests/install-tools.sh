#!/bin/bash
# Install the system tools the test suite needs (Debian 12 "bookworm").
#
#   sudo bash tests/install-tools.sh
#
# Idempotent: running it again only re-checks. Works in a container where
# systemd is not running: package maintainer scripts are told (through
# /usr/sbin/policy-rc.d, exit code 101) not to start any service, and the
# policy file is removed again afterwards unless it was there before.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
	echo "install-tools.sh: must run as root (try: sudo bash tests/install-tools.sh)" >&2
	exit 1
fi

PACKAGES=(
	prometheus               # promtool (check rules, test rules, check metrics)
	prometheus-node-exporter # the textfile collector the .prom file is written for
	systemd                  # systemd-analyze verify / security --offline
	udev                     # udevadm verify for 10-usbports.rules
	python3
	python3-venv # the README's commands make a .venv (Debian's python3 needs this)
	python3-serial
	python3-click
	python3-pytest
	python3-hypothesis
	time # GNU time: peak RSS in bench/run.py (tests/test_bench.py)
	faketime # a wrong host clock for one run (tests/test_summer_time.py, test_hostile_time.py)
	# The Debian package and its test under a real systemd (tests/test_package.py,
	# tests/test_container.py); the package's build dependencies come from
	# debian/control below.
	dpkg-dev          # dpkg-buildpackage
	lintian           # checks the built .deb
	debootstrap       # the Debian 12 and 13 roots of the container (its trixie script and debian-archive-keyring's trixie keys suffice)
	systemd-container # systemd-nspawn
	util-linux        # nsenter
)

export DEBIAN_FRONTEND=noninteractive

policy=/usr/sbin/policy-rc.d
created_policy=no
cleanup() {
	if [ "$created_policy" = yes ]; then
		rm -f "$policy"
	fi
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\n# written by kamstrup_textfile tests/install-tools.sh\nexit 101\n' >"$policy"
	chmod 0755 "$policy"
	created_policy=yes
fi

apt-get update
apt-get install -y --no-install-recommends \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	"${PACKAGES[@]}"
# Build-Depends of debian/control (apt reads them from the source tree).
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
apt-get build-dep -y --no-install-recommends "$top/"

missing=0
for tool in promtool systemd-analyze udevadm /usr/bin/prometheus-node-exporter /usr/bin/python3 /usr/bin/time \
	dpkg-buildpackage lintian /usr/sbin/debootstrap systemd-nspawn nsenter faketime; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "install-tools.sh: ERROR: $tool is still missing after apt-get install" >&2
		missing=1
	fi
done
if ! /usr/bin/python3 -c 'import serial, click, pytest, hypothesis' 2>/dev/null; then
	echo "install-tools.sh: ERROR: Debian's python3 cannot import serial, click, pytest and hypothesis" >&2
	missing=1
fi
if [ "$missing" -ne 0 ]; then
	exit 1
fi
echo "install-tools.sh: all tools present ($(promtool --version 2>&1 | head -n1); $(systemd-analyze --version | head -n1))"
