#!/bin/sh
# Make sure the Debian packages caretaker's stack and tests use are installed.
#
#   scripts/ensure-packages.sh COMMAND:PACKAGE ...
#
# For each pair, COMMAND is looked up on PATH; if it is missing, PACKAGE is installed
# with apt-get (as root, or through passwordless sudo), and we say so. When we cannot
# install, we print the exact command to run and exit 1. Installing never starts the
# packages' own system services (a temporary policy-rc.d says no), so a system
# Prometheus or Redis does not appear on the ports the local stack uses.
set -eu

missing=""
for pair in "$@"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    case $cmd in
        venv) python3 -c 'import ensurepip, venv' 2>/dev/null && continue ;;
        postgres) ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && continue ;;
        *) command -v "$cmd" >/dev/null 2>&1 && continue ;;
    esac
    missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "caretaker needs these programs (Debian package names):$missing" >&2
    echo "Install them with your system's package manager, then try again." >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "caretaker needs these Debian packages:$missing" >&2
    echo "Install them with:" >&2
    echo "    sudo apt-get install --no-install-recommends$missing" >&2
    exit 1
fi

echo "caretaker: installing missing Debian packages:$missing"
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# added by caretaker scripts/ensure-packages.sh while installing\nexit 101\n' \
        | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() { [ -n "$created_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d; }
trap cleanup EXIT INT TERM
$SUDO apt-get update -qq
# shellcheck disable=SC2086 # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
