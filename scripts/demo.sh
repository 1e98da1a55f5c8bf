#!/usr/bin/env bash
# The demo: a host service in the background with its data in $DEMO_DATA, a Generation 2
# VM "demo" from the tiny image, booted. Running it again reuses what is there.
# `scripts/demo.sh stop` stops the VM and the service.
set -euo pipefail
HV=${HV:-.venv/bin/hv}
DEMO_DATA=${DEMO_DATA:-$PWD/demo-data}
export HV_HOST="unix:$DEMO_DATA/hv.sock"
mkdir -p "$DEMO_DATA"

service_up() { "$HV" host info >/dev/null 2>&1; }

if [ "${1:-}" = stop ]; then
  if service_up; then
    "$HV" vm stop demo --turn-off >/dev/null 2>&1 || true
    pkill -TERM -f "hv serve --data-dir $DEMO_DATA" || true
  fi
  echo "demo stopped"
  exit 0
fi

if ! service_up; then
  echo "==> starting the host service (data in $DEMO_DATA, log in $DEMO_DATA/serve.log)"
  nohup "$HV" serve --data-dir "$DEMO_DATA" >>"$DEMO_DATA/serve.log" 2>&1 </dev/null &
  for _ in $(seq 1 100); do service_up && break; sleep 0.2; done
  service_up || { echo "the host service did not start; see $DEMO_DATA/serve.log" >&2; exit 1; }
fi

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

echo "==> waiting for the guest to boot (UEFI under TCG takes a few seconds)"
for _ in $(seq 1 180); do
  "$HV" vm log demo | grep -q "hvstack-tiny: ready" && break
  sleep 1
done
"$HV" vm log demo | grep -q "hvstack-tiny: ready" || {
  echo "the guest did not report ready within 180 s; see: $HV vm log demo" >&2; exit 1; }

echo
"$HV" vm list
echo
echo "==> the last lines of its serial console"
"$HV" vm log demo | tail -n 12
cat <<MSG

The VM 'demo' is running. Try, in this folder:
  export HV_HOST=$HV_HOST PATH=\$PWD/.venv/bin:\$PATH
  hv vm show demo                 # settings, state, integration services (-o json too)
  hv vm exec demo -- uname -a     # run a command in the guest, no network needed
  hv vm console demo              # its serial console (Ctrl-] detaches)
  hv vm save demo                 # save its memory state; 'hv vm start demo' resumes it
  hv vm stop demo                 # shut down through the guest agent (else ACPI)
  hv vm start demo --no-wait      # start it again, as a job (hv job list)
  hv vm delete demo --delete-disks
  hv host info                    # which accelerator is in use and why
  make demo-stop                  # stop the VM and the host service
MSG
