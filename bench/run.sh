#!/usr/bin/env bash
# Side-by-side benchmark: Switchboard against the tutorial's Node server.
#
#   bench/run.sh            full run: 3 repetitions, idle N = 1k 5k 10k 19k,
#                           10 s fan-out runs (about 12 minutes)
#   bench/run.sh --quick    1 repetition, idle N = 1k 5k, 3 s fan-out runs
#                           (about 2 minutes)
#   bench/run.sh --no-build skip cargo build / npm ci (binaries must exist)
#   bench/run.sh --cluster  cluster mode instead (see bench/cluster.sh): a
#                           private redis-server and nats-server; Switchboard
#                           on the memory bus (1 instance), on Redis and on
#                           NATS (2 instances), and the tutorial's
#                           server-redis.js (2 instances): idle memory per
#                           connection (10k, 19k on one instance), saturation
#                           (1,000 subscribers over the instances, 1
#                           publisher, window 16), rate (100 subscribers x
#                           1,000 msg/s), then 1, 2, 3 instances on Redis and
#                           NATS at 1,000 subscribers x 100 msg/s; 3
#                           repetitions, 10 s runs (about 25 minutes).
#                           With --quick: 1 repetition, idle 2k, 3 s runs
#                           (about 5 minutes). Results in
#                           bench/results/<date>-cluster[-quick]/.
#
# Every scenario gets a fresh server, Switchboard and Node back to back.
# Results (one JSON file per run) go to bench/results/<date>/; then
# bench/report.py writes the medians into BENCHMARKS.md and the plots into
# docs/bench/. Loopback only. The tool and each server stay below the
# 20,000 open-file limit (idle tops out at 19,000 connections).
#
# CARGO_TARGET_DIR is honoured (default: target/ at the repository root).
#
# Not run from here: bench/pubsub_traffic.sh [--build] measures what a
# Pub/Sub instance receives from the bus with 1 or 32 channel shards (needs
# the Pub/Sub emulator; about a minute; BENCHMARKS.md, "Pub/Sub: what an
# instance receives").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
BUILD=1
CLUSTER=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --cluster) CLUSTER=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SB_BIN=$TARGET/release/switchboard
BENCH_BIN=$TARGET/release/switchboard-bench
NODE_DIR=$ROOT/bench/tutorial-server

if [ "$QUICK" = 1 ]; then
  REPS=1; IDLE_NS="1000 5000"; DURATION=3; MODE_LABEL=quick
else
  REPS=3; IDLE_NS="1000 5000 10000 19000"; DURATION=10; MODE_LABEL=full
fi
if [ "$CLUSTER" = 1 ]; then
  MODE_LABEL=cluster
  [ "$QUICK" = 1 ] && MODE_LABEL=cluster-quick
fi
SAT_SUBS="100 1000"
SAT_PUBLISHERS=4
SAT_WINDOW=16
RATE_SUBS=100
RATE=1000
SIZE=64

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/$STAMP-$MODE_LABEL
mkdir -p "$OUT/logs"
echo "results: $OUT"

# Each process may hold 20,000 files here; the servers and the tool need
# one per connection (plus a few).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ulimit -n 20000 2>/dev/null || true

if [ "$BUILD" = 1 ]; then
  echo "== building (cargo build --release; npm ci)"
  (cd "$ROOT" && cargo build --release --quiet)
  (cd "$ROOT" && cargo build --release --quiet -p switchboard-bench)
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --silent)
fi
for f in "$SB_BIN" "$BENCH_BIN" "$NODE_DIR/node_modules/ws/package.json" \
    "$NODE_DIR/node_modules/redis/package.json"; do
  [ -e "$f" ] || { echo "run.sh: missing $f (run without --no-build)" >&2; exit 1; }
done

PORT=$((19200 + RANDOM % 500))
SERVER_PID=
LABEL=

start_server() { # start_server switchboard|node LOGNAME
  local which=$1 log=$OUT/logs/$2.log
  PORT=$((PORT + 1))
  if [ "$which" = switchboard ]; then
    # --rate-limit 0: the per-connection message rate limit (100/s by default)
    # would otherwise drop the publishers' messages. --handshake-rate 0: the
    # reconnect-storm admission (5000/s by default) would cap handshakes/s;
    # the per-address limits (256 connections, 20 handshakes/s) would stop
    # clients that all come from 127.0.0.1.
    "$SB_BIN" --port "$PORT" --host 127.0.0.1 --rate-limit 0 --handshake-rate 0 \
      --max-connections-per-ip 0 --handshake-rate-per-ip 0 >"$log" 2>&1 &
  else
    (cd "$NODE_DIR" && PORT=$PORT exec node server.js) >"$log" 2>&1 &
  fi
  SERVER_PID=$!
  for _ in $(seq 1 200); do
    if curl -sf -o /dev/null "http://127.0.0.1:$PORT/_ah/health"; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "run.sh: $which did not come up on port $PORT (see $log)" >&2
  stop_server
  return 1
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
trap stop_server EXIT

COMMANDS=$OUT/commands.txt
: >"$COMMANDS"

if [ "$CLUSTER" = 1 ]; then
  for tool in redis-server redis-cli nats-server; do
    command -v "$tool" >/dev/null || { echo "run.sh: --cluster needs $tool on PATH" >&2; exit 1; }
  done
  # shellcheck source=bench/cluster.sh
  . "$ROOT/bench/cluster.sh"
  exit 0
fi

# bench SERVER NAME ARGS...: fresh server, one tool run, server stopped.
bench() {
  local server=$1 name=$2; shift 2
  local json=$OUT/$name.json
  start_server "$server" "$name" || return 0
  local url=ws://127.0.0.1:$PORT/
  echo "switchboard-bench $* --url $url --pid <$server>" >>"$COMMANDS"
  echo "-- $name"
  if ! timeout 300 "$BENCH_BIN" "$@" --url "$url" --pid "$SERVER_PID" --json "$json" \
      >"$OUT/logs/$name.out" 2>&1; then
    echo "   (tool failed; see $OUT/logs/$name.out)"
  fi
  sed 's/^/   /' "$OUT/logs/$name.out"
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "   !! the $server server died during the run" | tee -a "$OUT/logs/$name.out"
  fi
  stop_server
}

cat >"$OUT/meta.json" <<EOF
{
  "mode": "$MODE_LABEL",
  "started": "$STAMP",
  "reps": $REPS,
  "idle_ns": [$(echo "$IDLE_NS" | sed 's/ /, /g')],
  "duration": $DURATION,
  "rate_subs": $RATE_SUBS, "rate": $RATE, "size": $SIZE,
  "sat_subs": [$(echo "$SAT_SUBS" | sed 's/ /, /g')],
  "sat_publishers": $SAT_PUBLISHERS, "sat_window": $SAT_WINDOW,
  "git": "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet -- src 2>/dev/null || echo '+dirty-src')",
  "node": "$(node --version)",
  "ws": "$(node -p "require('$NODE_DIR/node_modules/ws/package.json').version")",
  "express": "$(node -p "require('$NODE_DIR/node_modules/express/package.json').version")",
  "loadavg_start": "$(cut -d' ' -f1-3 /proc/loadavg)",
EOF

T0=$(date +%s)
for rep in $(seq 1 "$REPS"); do
  echo "== repetition $rep of $REPS"
  for n in $IDLE_NS; do
    for server in switchboard node; do
      bench "$server" "idle-$n-$server-r$rep" idle -n "$n"
    done
  done
  for server in switchboard node; do
    bench "$server" "rate-$RATE_SUBS-$server-r$rep" fanout --mode broadcast \
      --subscribers "$RATE_SUBS" --publishers 1 --rate "$RATE" --duration "$DURATION" --size "$SIZE"
  done
  for subs in $SAT_SUBS; do
    for server in switchboard node; do
      bench "$server" "sat-$subs-$server-r$rep" fanout --mode broadcast \
        --subscribers "$subs" --publishers "$SAT_PUBLISHERS" --saturate --window "$SAT_WINDOW" \
        --duration "$DURATION" --size "$SIZE"
    done
  done
  # Switchboard's own channel path (subscribe/publish); Node has none.
  bench switchboard "chrate-$RATE_SUBS-switchboard-r$rep" fanout --mode channel \
    --subscribers "$RATE_SUBS" --publishers 1 --rate "$RATE" --duration "$DURATION" --size "$SIZE"
  bench switchboard "chsat-1000-switchboard-r$rep" fanout --mode channel \
    --subscribers 1000 --publishers "$SAT_PUBLISHERS" --saturate --window "$SAT_WINDOW" \
    --duration "$DURATION" --size "$SIZE"
done
T1=$(date +%s)

cat >>"$OUT/meta.json" <<EOF
  "loadavg_end": "$(cut -d' ' -f1-3 /proc/loadavg)",
  "seconds": $((T1 - T0))
}
EOF
echo "== benchmarks took $((T1 - T0)) s"

python3 "$ROOT/bench/report.py" "$OUT" --benchmarks "$ROOT/BENCHMARKS.md" --plots "$ROOT/docs/bench"
