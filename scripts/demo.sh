#!/usr/bin/env bash
# The demo: a file-backed ZFS pool with a dataset for share `vms`, and fsrvpd serving it through
# its embedded SMB server on 127.0.0.1:1445 (user backup / password backup).  Ctrl-C stops it;
# running it again reuses the pool.  Everything lives under $DEMO_DIR.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-/var/tmp/fsrvpd-demo}
FSRVPD=${FSRVPD:-fsrvpd}
POOL=${DEMO_POOL:-fsrvpdemo}
PORT=${DEMO_PORT:-1445}
mkdir -p "$DEMO_DIR"

if ! zfs list >/dev/null 2>&1; then
    echo "starting zfs-fuse"
    zfs-fuse --pidfile "$DEMO_DIR/zfs-fuse.pid"
    for _ in $(seq 50); do zfs list >/dev/null 2>&1 && break; sleep 0.2; done
fi
if ! zpool list -H "$POOL" >/dev/null 2>&1; then
    if [ -f "$DEMO_DIR/pool.img" ] && zpool import -d "$DEMO_DIR" "$POOL" 2>/dev/null; then
        echo "imported pool $POOL"
    else
        rm -f "$DEMO_DIR/pool.img"
        truncate -s 1G "$DEMO_DIR/pool.img"
        zpool create -f -m none "$POOL" "$DEMO_DIR/pool.img"
        echo "created pool $POOL on $DEMO_DIR/pool.img"
    fi
fi
zfs list -H "$POOL/vms" >/dev/null 2>&1 || zfs create -o mountpoint="$DEMO_DIR/vms" "$POOL/vms"
[ -f "$DEMO_DIR/vms/disk.vhdx" ] || echo "demo virtual disk, version 1" > "$DEMO_DIR/vms/disk.vhdx"

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
Ctrl-C stops fsrvpd.

TXT
exec "$FSRVPD" run -c "$DEMO_DIR/fsrvpd.yaml"
