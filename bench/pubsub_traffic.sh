#!/usr/bin/env bash
# Pub/Sub bus: the traffic an instance receives when it serves 1 of 100 busy
# channels, with every channel on one topic (--pubsub-shards 1, the old
# design) and spread over 32 topics (the default).
#
#   bench/pubsub_traffic.sh [--build] [options of bench/pubsub_traffic.py]
#
#   --build          cargo build --release --bin switchboard first (otherwise
#                    the binary must exist)
#   --shards 1,32    layouts to run
#   --rate 500       total publications/s over busy-0..busy-99 (round-robin)
#   --seconds 10     length of the timed run
#   --payload 100    bytes of each publication's data (JSON)
#
# A private Pub/Sub emulator on a free loopback port (it needs the Cloud SDK's
# emulator and Java); per layout, instances A and B on fresh topics, one
# WebSocket subscriber on B to busy-0, a publisher on A's POST /api/publish.
# Prints a table of what A and B received from the bus over the timed run
# (busReceivedMessages, busReceivedBytes, busSubscriptions in /metrics) and
# writes the JSON and the logs to bench/results/<UTC date>-pubsub-traffic/.
# Fails if B's subscriber does not get exactly busy-0's publications. About a
# minute. See "Pub/Sub: what an instance receives" in BENCHMARKS.md.
#
# CARGO_TARGET_DIR is honoured (default: target/ at the repository root).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
EMULATOR=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
BUILD=0
PASS=()
for arg in "$@"; do
  case "$arg" in
    --build) BUILD=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) PASS+=("$arg") ;;
  esac
done

if [ ! -x "$EMULATOR" ] || ! command -v java >/dev/null; then
  echo "pubsub_traffic.sh: the Pub/Sub emulator ($EMULATOR) or Java is missing:" >&2
  echo "  apt-get install google-cloud-cli-pubsub-emulator openjdk-17-jre-headless" >&2
  echo "  (the emulator package comes from Google's Cloud SDK apt repository)" >&2
  exit 1
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SB_BIN=$TARGET/release/switchboard
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release --bin switchboard)
fi
if [ ! -x "$SB_BIN" ]; then
  echo "pubsub_traffic.sh: no $SB_BIN (run with --build)" >&2
  exit 1
fi

# The Python script stops what it starts; it runs as its own process group
# (setsid) so that this trap also stops whatever of that group is left (the
# emulator, the instances) if the script itself is killed or interrupted.
PGID=
cleanup() {
  if [ -n "$PGID" ] && kill -0 -- "-$PGID" 2>/dev/null; then
    kill -TERM -- "-$PGID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 -- "-$PGID" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$PGID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Without job control a background job is no group leader, so setsid does
# not fork: $! is the Python process and its new group's id.
setsid python3 "$ROOT/bench/pubsub_traffic.py" --bin "$SB_BIN" ${PASS[@]+"${PASS[@]}"} &
PGID=$!
set +e
wait "$PGID"
STATUS=$?
set -e
exit "$STATUS"
