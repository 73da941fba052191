#!/usr/bin/env bash
# Make sure a Mosquitto broker binary is installed and (unless --binary-only) that a broker
# answers. Prefers EDGELOOP_MQTT (host:port) or 127.0.0.1:1883; if nothing answers there, starts
# a private broker on a free local port. The address used is written to .edgeloop/broker.env.
set -euo pipefail
cd "$(dirname "$0")/.."

find_mosquitto() {
  command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true
}

if [ -z "$(find_mosquitto)" ] || ! command -v mosquitto_pub >/dev/null 2>&1; then
  bash "$(dirname "$0")/apt-install.sh" Mosquitto mosquitto mosquitto-clients
fi
MOSQUITTO="$(find_mosquitto)"
[ -n "$MOSQUITTO" ] || { echo "edgeloop: mosquitto binary not found after install" >&2; exit 1; }
[ "${1:-}" = "--binary-only" ] && exit 0

reachable() {  # host port
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

mkdir -p .edgeloop
ADDR="${EDGELOOP_MQTT:-127.0.0.1:1883}"
if reachable "${ADDR%:*}" "${ADDR##*:}"; then
  echo "EDGELOOP_MQTT=$ADDR" > .edgeloop/broker.env
  echo "edgeloop: broker reachable at $ADDR"
  exit 0
fi
# Reuse a broker this script started earlier, if it still answers.
if [ -f .edgeloop/broker.env ]; then
  . .edgeloop/broker.env
  if reachable "${EDGELOOP_MQTT%:*}" "${EDGELOOP_MQTT##*:}"; then
    echo "edgeloop: broker reachable at $EDGELOOP_MQTT"; exit 0
  fi
fi
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat > .edgeloop/mosquitto.conf <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest file $PWD/.edgeloop/mosquitto.log
CONF
"$MOSQUITTO" -d -c .edgeloop/mosquitto.conf
for _ in $(seq 50); do reachable 127.0.0.1 "$PORT" && break; sleep 0.1; done
reachable 127.0.0.1 "$PORT" || { echo "edgeloop: could not start mosquitto on port $PORT" >&2; exit 1; }
echo "EDGELOOP_MQTT=127.0.0.1:$PORT" > .edgeloop/broker.env
echo "edgeloop: started a private broker at 127.0.0.1:$PORT"
