# bench/cluster.sh — the cluster mode of bench/run.sh (sourced by it with
# --cluster; not run on its own). Uses from run.sh: ROOT OUT QUICK SB_BIN
# BENCH_BIN NODE_DIR COMMANDS.
#
# A private redis-server and a private nats-server (JetStream) on free
# loopback ports, and for each configuration a fresh set of instances:
#   sb-memory-1   Switchboard, memory bus, 1 instance (the baseline)
#   sb-redis-2    Switchboard, --bus redis://…, 2 instances
#   sb-nats-2     Switchboard, --bus nats://…,  2 instances
#   node-redis-2  the tutorial's server-redis.js ("Handling Multiple
#                 Instances" on Redis), 2 instances
# Per configuration: idle memory per connection (N connections on the
# first instance only), saturation (1,000 subscribers spread over the
# instances, 1 publisher, window 16) and a fixed rate (100 subscribers x
# 1,000 msg/s). Then the scaling series: 1, 2, 3 Switchboard instances on
# Redis and on NATS at the same subscribers and rate. Every run starts
# fresh instances with their own bus prefix.

if [ "$QUICK" = 1 ]; then
  C_REPS=1; C_IDLE_NS="2000"; C_DURATION=3
else
  C_REPS=3; C_IDLE_NS="10000 19000"; C_DURATION=10
fi
C_SAT_SUBS=1000; C_SAT_WINDOW=16
C_RATE_SUBS=100; C_RATE=1000
C_SCALE_SUBS=1000; C_SCALE_RATE=100; C_SCALE_NS="1 2 3"
C_SIZE=64
CONFIGS="sb-memory-1 sb-redis-2 sb-nats-2 node-redis-2"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # wait_http URL PID: until URL answers 2xx or PID dies (20 s)
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

BUS_DIR=$(mktemp -d)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  >"$OUT/logs/redis-server.log" 2>&1 &
REDIS_PID=$!
NATS_PORT=$(free_port)
nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$BUS_DIR/nats" \
  >"$OUT/logs/nats-server.log" 2>&1 &
NATS_PID=$!
INSTANCE_PIDS=()
INSTANCE_URLS=()

stop_instances() {
  local pid
  for pid in "${INSTANCE_PIDS[@]}"; do stop_pid "$pid"; done
  INSTANCE_PIDS=()
  INSTANCE_URLS=()
}
cluster_cleanup() {
  stop_instances
  stop_pid "$REDIS_PID"
  stop_pid "$NATS_PID"
  rm -rf "$BUS_DIR"
}
trap cluster_cleanup EXIT

for _ in $(seq 1 100); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 \
  || { echo "run.sh: the private redis-server did not start (see $OUT/logs/redis-server.log)" >&2; exit 1; }
# nats-server's monitoring port is off; a TCP connect that gets the INFO line.
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT" && head -c 4 <&3 | grep -q INFO) 2>/dev/null && break
  sleep 0.1
done
kill -0 "$NATS_PID" 2>/dev/null \
  || { echo "run.sh: the private nats-server did not start (see $OUT/logs/nats-server.log)" >&2; exit 1; }
echo "private redis-server :$REDIS_PORT (pid $REDIS_PID), nats-server :$NATS_PORT (pid $NATS_PID)"

RUN_SEQ=0
# start_instances KIND BUS N LOGNAME: KIND switchboard|node, BUS
# memory|redis|nats; fills INSTANCE_PIDS / INSTANCE_URLS; BUS_PID is the
# bus server's pid (empty for memory).
start_instances() {
  local kind=$1 bus=$2 n=$3 name=$4 i port log busurl
  RUN_SEQ=$((RUN_SEQ + 1))
  case "$bus" in
    memory) busurl=memory; BUS_PID= ;;
    redis) busurl=redis://127.0.0.1:$REDIS_PORT; BUS_PID=$REDIS_PID ;;
    nats) busurl=nats://127.0.0.1:$NATS_PORT; BUS_PID=$NATS_PID ;;
  esac
  for i in $(seq 1 "$n"); do
    port=$(free_port)
    log=$OUT/logs/$name-i$i.log
    if [ "$kind" = switchboard ]; then
      # The flags of run.sh's start_server, plus the bus; a bus prefix of
      # its own per run so that no run sees another's streams or keys.
      env -u GAE_INSTANCE "$SB_BIN" --port "$port" --host 127.0.0.1 --rate-limit 0 \
        --handshake-rate 0 --max-connections-per-ip 0 --handshake-rate-per-ip 0 \
        --bus "$busurl" --bus-prefix "bench$RUN_SEQ" --instance-id "sb-$i" >"$log" 2>&1 &
    else
      (cd "$NODE_DIR" && PORT=$port REDIS_URL=$busurl GAE_INSTANCE=node-$i \
        exec node server-redis.js) >"$log" 2>&1 &
    fi
    INSTANCE_PIDS+=("$!")
    INSTANCE_URLS+=("ws://127.0.0.1:$port/")
    local probe=http://127.0.0.1:$port/_ah/health
    [ "$kind" = switchboard ] && probe=http://127.0.0.1:$port/readyz
    if ! wait_http "$probe" "$!"; then
      echo "run.sh: $kind instance $i ($bus) did not come up on port $port (see $log)" >&2
      stop_instances
      return 1
    fi
  done
}

# cbench KIND BUS N NAME ARGS...: fresh instances, one tool run, stopped.
# ALL=1: every instance's URL and pid; ALL=0: the first instance only.
cbench() {
  local kind=$1 bus=$2 n=$3 name=$4; shift 4
  local json=$OUT/$name.json
  start_instances "$kind" "$bus" "$n" "$name" || return 0
  local targets=() shown=() i
  if [ "${ALL:-1}" = 1 ]; then
    for i in "${!INSTANCE_PIDS[@]}"; do
      targets+=(--url "${INSTANCE_URLS[$i]}" --pid "${INSTANCE_PIDS[$i]}")
      shown+=(--url "${INSTANCE_URLS[$i]}" --pid "<$kind-$((i + 1))>")
    done
    if [ -n "$BUS_PID" ]; then
      targets+=(--bus-pid "$BUS_PID")
      shown+=(--bus-pid "<$bus-server>")
    fi
  else
    targets=(--url "${INSTANCE_URLS[0]}" --pid "${INSTANCE_PIDS[0]}")
    shown=(--url "${INSTANCE_URLS[0]}" --pid "<$kind-1>")
  fi
  echo "switchboard-bench $* ${shown[*]}   # $name: $n × $kind, $bus bus" >>"$COMMANDS"
  echo "-- $name"
  if ! timeout 300 "$BENCH_BIN" "$@" "${targets[@]}" --json "$json" \
      >"$OUT/logs/$name.out" 2>&1; then
    echo "   (tool failed; see $OUT/logs/$name.out)"
  fi
  sed 's/^/   /' "$OUT/logs/$name.out"
  for i in "${!INSTANCE_PIDS[@]}"; do
    if ! kill -0 "${INSTANCE_PIDS[$i]}" 2>/dev/null; then
      echo "   !! $kind instance $((i + 1)) died during the run" | tee -a "$OUT/logs/$name.out"
    fi
  done
  stop_instances
}

config_parts() { # config_parts sb-redis-2 -> "switchboard redis 2"
  local kind=${1%%-*} rest=${1#*-}
  [ "$kind" = sb ] && kind=switchboard
  echo "$kind ${rest%-*} ${rest##*-}"
}

cat >"$OUT/meta.json" <<JSON
{
  "mode": "$MODE_LABEL",
  "started": "$STAMP",
  "reps": $C_REPS,
  "configs": [$(printf '"%s", ' $CONFIGS | sed 's/, $//')],
  "idle_ns": [$(echo "$C_IDLE_NS" | sed 's/ /, /g')],
  "duration": $C_DURATION,
  "sat_subs": $C_SAT_SUBS, "sat_publishers": 1, "sat_window": $C_SAT_WINDOW,
  "rate_subs": $C_RATE_SUBS, "rate": $C_RATE, "size": $C_SIZE,
  "scale_subs": $C_SCALE_SUBS, "scale_rate": $C_SCALE_RATE, "scale_ns": [$(echo "$C_SCALE_NS" | sed 's/ /, /g')],
  "git": "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet -- src 2>/dev/null || echo '+dirty-src')",
  "redis": "$(redis-server --version | grep -o 'v=[^ ]*' | cut -c3-)",
  "nats": "$(nats-server --version | awk '{print $2}')",
  "node": "$(node --version)",
  "node_redis": "$(node -p "require('$NODE_DIR/node_modules/redis/package.json').version")",
  "loadavg_start": "$(cut -d' ' -f1-3 /proc/loadavg)",
JSON

T0=$(date +%s)
for rep in $(seq 1 "$C_REPS"); do
  echo "== cluster repetition $rep of $C_REPS"
  for cfg in $CONFIGS; do
    read -r kind bus n <<<"$(config_parts "$cfg")"
    for idle_n in $C_IDLE_NS; do
      ALL=0 cbench "$kind" "$bus" "$n" "idle-$idle_n-$cfg-r$rep" idle -n "$idle_n"
    done
    cbench "$kind" "$bus" "$n" "sat-$C_SAT_SUBS-$cfg-r$rep" fanout --mode broadcast \
      --subscribers "$C_SAT_SUBS" --publishers 1 --saturate --window "$C_SAT_WINDOW" \
      --duration "$C_DURATION" --size "$C_SIZE"
    cbench "$kind" "$bus" "$n" "rate-$C_RATE_SUBS-$cfg-r$rep" fanout --mode broadcast \
      --subscribers "$C_RATE_SUBS" --publishers 1 --rate "$C_RATE" \
      --duration "$C_DURATION" --size "$C_SIZE"
  done
  for bus in redis nats; do
    for n in $C_SCALE_NS; do
      cbench switchboard "$bus" "$n" "scale-$bus-$n-r$rep" fanout --mode broadcast \
        --subscribers "$C_SCALE_SUBS" --publishers 1 --rate "$C_SCALE_RATE" \
        --duration "$C_DURATION" --size "$C_SIZE"
    done
  done
done
T1=$(date +%s)

cat >>"$OUT/meta.json" <<JSON
  "loadavg_end": "$(cut -d' ' -f1-3 /proc/loadavg)",
  "seconds": $((T1 - T0))
}
JSON
echo "== cluster benchmarks took $((T1 - T0)) s"
python3 "$ROOT/bench/report.py" "$OUT" --benchmarks "$ROOT/BENCHMARKS.md" --plots "$ROOT/docs/bench"
