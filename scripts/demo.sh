#!/usr/bin/env bash
# The demo: a host service in the background with its data in $DEMO_DATA, listening on
# the unix socket $DEMO_DATA/hv.sock, and a Generation 2 VM "demo" from the tiny image,
# booted. Running it again reuses what is there. It writes $DEMO_DATA/env (source it, or
# copy the export line it prints, to reach the demo service from your shell).
# `scripts/demo.sh stop` shuts the VM down (through its guest, turned off only if that
# fails) and stops the demo's own host service, by the pid it recorded.
set -euo pipefail
HV=${HV:-.venv/bin/hv}
DEMO_DATA=${DEMO_DATA:-$PWD/demo-data}
DEMO_DATA=$(mkdir -p "$DEMO_DATA" && cd "$DEMO_DATA" && pwd)
SOCKET=$DEMO_DATA/hv.sock
PIDFILE=$DEMO_DATA/serve.pid
export HV_HOST="unix:$SOCKET"
HV_BIN=$(cd "$(dirname "$HV")" && pwd)

service_up() { "$HV" host info >/dev/null 2>&1; }

# The pid in $PIDFILE if it is still the demo's own `hv serve`, else nothing.
demo_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 0
  pid=$(cat "$PIDFILE")
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "serve --data-dir $DEMO_DATA " && echo "$pid"
  return 0
}

if [ "${1:-}" = stop ]; then
  if service_up && "$HV" vm show demo >/dev/null 2>&1; then
    state=$("$HV" vm show demo -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    if [ "$state" != Off ] && [ "$state" != Saved ]; then
      echo "==> shutting 'demo' down through its guest (turned off after 60 s, or if that fails)"
      "$HV" vm stop demo --timeout 60 || "$HV" vm stop demo --turn-off || true
    fi
  fi
  pid=$(demo_pid)
  if [ -n "$pid" ]; then
    echo "==> stopping the demo's host service (pid $pid)"
    kill -TERM "$pid"
    # demo_pid, not kill -0: an exited process that is not yet reaped is gone too.
    for _ in $(seq 1 300); do [ -n "$(demo_pid)" ] || break; sleep 0.2; done
    if [ -n "$(demo_pid)" ]; then
      echo "the host service (pid $pid) did not stop within 60 s; see $DEMO_DATA/serve.log" >&2
      exit 1
    fi
    rm -f "$PIDFILE"
  elif service_up; then
    echo "a host service answers on $SOCKET, but make demo did not start it (no pid in" \
         "$PIDFILE): left running" >&2
  fi
  echo "demo stopped"
  exit 0
fi

if ! service_up; then
  echo "==> starting the host service (data in $DEMO_DATA, log in $DEMO_DATA/serve.log)"
  nohup "$HV" serve --data-dir "$DEMO_DATA" --listen "unix:$SOCKET" \
    >>"$DEMO_DATA/serve.log" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do service_up && break; sleep 0.2; done
  service_up || { echo "the host service did not start; see $DEMO_DATA/serve.log" >&2; exit 1; }
fi
printf 'export HV_HOST=%q PATH=%q:$PATH\n' "$HV_HOST" "$HV_BIN" >"$DEMO_DATA/env"

echo "==> the tiny guest image"
"$HV" image build tiny

if ! "$HV" vm show demo >/dev/null 2>&1; then
  echo "==> creating the Generation 2 VM 'demo'"
  "$HV" vm create demo --generation 2 --image tiny --memory 256M --cpus 1 \
    --notes "made by make demo"
fi

state=$("$HV" vm show demo -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
case "$state" in
  Off|Saved) echo "==> starting 'demo'"; "$HV" vm start demo ;;
  Paused) "$HV" vm resume demo ;;
esac

# Booted means its guest agent answers (heartbeat OK): the console log also holds the
# lines of earlier boots, so a "ready" line in it proves nothing about this one.
heartbeat() { "$HV" vm show demo -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["heartbeat"])'; }
echo "==> waiting for the guest to boot (UEFI under TCG takes a few seconds)"
for _ in $(seq 1 180); do
  [ "$(heartbeat)" = OK ] && break
  sleep 1
done
[ "$(heartbeat)" = OK ] || {
  echo "the guest's agent did not answer within 180 s; see: $HV vm log demo" >&2; exit 1; }

echo
"$HV" vm list
echo
echo "==> the last lines of its serial console"
"$HV" vm log demo | tail -n 12
cat <<MSG

The VM 'demo' is running. To reach the demo's host service from your shell, run:

  source $DEMO_DATA/env    # that is: export HV_HOST=$HV_HOST PATH=$HV_BIN:\$PATH

Then try:
  hv vm show demo                 # settings, state, integration services (-o json too)
  hv vm exec demo -- uname -a     # run a command in the guest, no network needed
  hv vm console demo              # its serial console (Ctrl-] detaches)
  hv vm save demo                 # save its memory state; 'hv vm start demo' resumes it
  hv vm stop demo                 # shut down through the guest agent (else ACPI)
  hv vm start demo --no-wait      # start it again, as a job (hv job list)
  hv job list                     # jobs; 'hv job show ID' takes any unique prefix of an id
  hv vm delete demo --delete-disks
  hv host info                    # which accelerator is in use and why
  make demo-stop                  # shut the VM down and stop the demo's host service
MSG
