#!/usr/bin/env bash
# The demo: fsrvpd serving share `vms` through its embedded SMB server on 127.0.0.1:1445 (user
# backup / password backup), metrics on http://127.0.0.1:9720/metrics, fsrvpctl on
# $DEMO_DIR/admin.sock, on a file-backed store of the chosen BACKEND.  Ctrl-C stops it.
# Everything lives under $DEMO_DIR.
#   BACKEND=zfs (default): a ZFS pool with a dataset for `vms` (demo-pool.sh); running the demo
#     again reuses the pool.
#   BACKEND=lvm: a thin pool on a loop file with an ext4 volume for `vms` (demo-lvm.sh), removed
#     when fsrvpd stops. Needs device-mapper (the throwaway VM of the tests has it).
set -euo pipefail
BACKEND=${BACKEND:-zfs}
DEMO_DIR=${DEMO_DIR:-/var/tmp/fsrvpd-demo}
FSRVPD=${FSRVPD:-fsrvpd}
PORT=${DEMO_PORT:-1445}
METRICS_PORT=${DEMO_METRICS_PORT:-9720}
case "$BACKEND" in
    zfs) source "$(dirname "$0")/demo-pool.sh"; STORE="ZFS dataset $POOL/vms" ;;
    lvm) source "$(dirname "$0")/demo-lvm.sh" ;;
    *) echo "BACKEND must be zfs or lvm, not '$BACKEND'" >&2; exit 2 ;;
esac

cat > "$DEMO_DIR/fsrvpd.yaml" <<YAML
# Written by scripts/demo.sh
server:
  netbios_name: FSRVPD-DEMO
front_door:
  mode: embedded
  listen: 127.0.0.1
  port: $PORT
users:
  backup:
    nt_hash: $(echo backup | "$FSRVPD" nt-hash)
state_dir: $DEMO_DIR/state
metrics:
  listen: 127.0.0.1
  port: $METRICS_PORT
admin:
  socket: $DEMO_DIR/admin.sock
shares:
  vms:
    path: $DEMO_DIR/vms
    backend: $BACKEND
YAML
chmod 600 "$DEMO_DIR/fsrvpd.yaml"  # it holds an NT hash

cat <<TXT

fsrvpd demo: share 'vms' on $STORE, embedded SMB server on 127.0.0.1:$PORT
Try, in another terminal (RPC calls must be signed ([sign]) or sealed ([seal]), as MS-FSRVP asks):
  rpcclient -p $PORT -U backup%backup 'ncacn_np:127.0.0.1[sign]' -c 'fss_get_sup_version'
  rpcclient -p $PORT -U backup%backup 'ncacn_np:127.0.0.1[sign]' -c 'fss_is_path_sup vms'
  rpcclient -p $PORT -U backup%backup 'ncacn_np:127.0.0.1[seal]' -c 'fss_create_expose backup ro vms'
  smbclient -p $PORT -U backup%backup -L 127.0.0.1
  smbclient -p $PORT -U backup%backup '//127.0.0.1/vms@{<shadow copy id printed above>}' -c 'get disk.vhdx -'
  rpcclient -p $PORT -U backup%backup 'ncacn_np:127.0.0.1[sign]' -c 'fss_delete vms <set id> <shadow copy id>'
  ${FSRVPD%fsrvpd}fsrvpctl -s $DEMO_DIR/admin.sock status    (also: sets, shares, doctor vms, prune, ...)
  curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep ^fsrvpd_
Ctrl-C stops fsrvpd.

TXT
if [ "$BACKEND" = zfs ]; then
    exec "$FSRVPD" run -c "$DEMO_DIR/fsrvpd.yaml"
fi
# LVM: fsrvpd in the background, so that this shell is still there to clean up when it stops.
"$FSRVPD" run -c "$DEMO_DIR/fsrvpd.yaml" &
FSRVPD_PID=$!
trap 'kill -INT $FSRVPD_PID 2>/dev/null' INT TERM
while kill -0 "$FSRVPD_PID" 2>/dev/null; do wait "$FSRVPD_PID" || true; done
