#!/usr/bin/env bash
# The demo: a file-backed ZFS pool with a dataset for share `vms`, and fsrvpd serving it through
# its embedded SMB server on 127.0.0.1:1445 (user backup / password backup), metrics on
# http://127.0.0.1:9720/metrics, fsrvpctl on $DEMO_DIR/admin.sock.  Ctrl-C stops it;
# running it again reuses the pool.  Everything lives under $DEMO_DIR.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-/var/tmp/fsrvpd-demo}
FSRVPD=${FSRVPD:-fsrvpd}
PORT=${DEMO_PORT:-1445}
METRICS_PORT=${DEMO_METRICS_PORT:-9720}
source "$(dirname "$0")/demo-pool.sh"

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
    backend: zfs
YAML

cat <<TXT

fsrvpd demo: share 'vms' on ZFS dataset $POOL/vms, embedded SMB server on 127.0.0.1:$PORT
Try, in another terminal:
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_get_sup_version'
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_is_path_sup vms'
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_create_expose backup ro vms'
  smbclient -p $PORT -U backup%backup -L 127.0.0.1
  smbclient -p $PORT -U backup%backup '//127.0.0.1/vms@{<shadow copy id printed above>}' -c 'get disk.vhdx -'
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_delete vms <set id> <shadow copy id>'
  ${FSRVPD%fsrvpd}fsrvpctl -s $DEMO_DIR/admin.sock status    (also: sets, shares, doctor vms, prune, ...)
  curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep ^fsrvpd_
Ctrl-C stops fsrvpd.

TXT
exec "$FSRVPD" run -c "$DEMO_DIR/fsrvpd.yaml"
