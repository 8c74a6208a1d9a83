#!/usr/bin/env bash
# Boots one husk VM and reports the wall time to the agent's first console
# line; with --initcalls the guest also logs every initcall with its
# duration, and the slowest ones are listed (see docs/boot-time.md).
#
# Usage: bench/profile-boot.sh [--initcalls] [--mem-mib N] [--kernel VMLINUX]
#                              [-- extra kernel words]
set -euo pipefail
vmm=${HUSK_VMM:-$(dirname "$0")/../target/release/husk-vmm}
mem=128
extra=""
initcalls=0
kernel=()
while [ $# -gt 0 ]; do
  case "$1" in
    --initcalls) initcalls=1; extra="$extra initcall_debug ignore_loglevel" ;;
    --mem-mib) mem=$2; shift ;;
    --kernel) kernel=(--kernel "$2"); shift ;;
    --) shift; extra="$extra $*"; break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
dir=$(mktemp -d /tmp/husk-profile.XXXXXX)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
start=$(date +%s.%N)
"$vmm" "${kernel[@]}" --mem-mib "$mem" --serial-log "$dir/serial.log" --vsock-uds "$dir/v.sock" \
  --api-socket "$dir/api.sock" --cmdline "$extra" > "$dir/vmm.log" 2>&1 &
pid=$!
until grep -q "husk-agent .* starting" "$dir/serial.log" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { echo "husk-vmm exited early:"; cat "$dir/vmm.log"; exit 1; }
  sleep 0.05
done
end=$(date +%s.%N)
printf 'marker after %.2f s (mem %s MiB, extra: %s)\n' "$(echo "$end - $start" | bc)" "$mem" "${extra:-none}"
if [ "$initcalls" = 1 ]; then
  echo "slowest initcalls (usecs):"
  grep -oE "initcall [^ ]+ returned -?[0-9]+ after [0-9]+ usecs" "$dir/serial.log" |
    awk '{print $6, $2}' | sort -rn | head -15
  grep -E "Run /init" "$dir/serial.log" || true
fi
printf '{"action":"stop"}\n' | python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.buffer.read()); s.recv(256)' "$dir/api.sock"
wait $pid
