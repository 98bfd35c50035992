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
# Debian's invoke-rc.d asks this file whether a package may start its service; exit 101
# means no. Docker-based images ship one already: then it is left as it is.
policy=${CARETAKER_POLICY_RC_D:-/usr/sbin/policy-rc.d}   # the variable is for the script's own tests
created_policy=""
# The script's exit status is the one it had before cleanup, never cleanup's own: an
# EXIT trap whose last command is false would otherwise turn success into failure.
cleanup() {
    status=$?
    if [ -n "$created_policy" ]; then $SUDO rm -f "$policy"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# added by caretaker scripts/ensure-packages.sh while installing\nexit 101\n' \
        | $SUDO tee "$policy" >/dev/null
    created_policy=1
    $SUDO chmod 755 "$policy"
fi
$SUDO apt-get update -qq
# shellcheck disable=SC2086 # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
