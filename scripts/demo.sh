#!/usr/bin/env bash
# The demo: fsrvpd serving share `vms` through its embedded SMB server on 127.0.0.1:1445 (user
# backup / password backup), on a file-backed store of the chosen BACKEND. Everything lives under
# $DEMO_DIR. Ctrl-C stops it.
#   BACKEND=zfs (default): a ZFS pool (zfs-fuse where the kernel has no ZFS) with a dataset for
#     `vms`; running the demo again reuses the pool.
#   BACKEND=lvm: a thin pool on a loop file with an ext4 volume mounted for `vms`; Ctrl-C removes
#     all of it. Needs device-mapper (run it in the throwaway VM where the kernel has none).
set -euo pipefail
BACKEND=${BACKEND:-zfs}
DEMO_DIR=${DEMO_DIR:-/var/tmp/fsrvpd-demo}
FSRVPD=${FSRVPD:-fsrvpd}
PORT=1445
NAME=fsrvpdemo

setup_zfs() {
    if ! zfs list >/dev/null 2>&1; then
        echo "starting zfs-fuse"
        zfs-fuse --pidfile "$DEMO_DIR/zfs-fuse.pid"
        for _ in $(seq 50); do zfs list >/dev/null 2>&1 && break; sleep 0.2; done
    fi
    if ! zpool list -H "$NAME" >/dev/null 2>&1; then
        if [ -f "$DEMO_DIR/pool.img" ] && zpool import -d "$DEMO_DIR" "$NAME" 2>/dev/null; then
            echo "imported pool $NAME"
        else
            rm -f "$DEMO_DIR/pool.img"
            truncate -s 1G "$DEMO_DIR/pool.img"
            zpool create -f -m none "$NAME" "$DEMO_DIR/pool.img"
            echo "created pool $NAME on $DEMO_DIR/pool.img"
        fi
    fi
    zfs list -H "$NAME/vms" >/dev/null 2>&1 || zfs create -o mountpoint="$DEMO_DIR/vms" "$NAME/vms"
    STORE="ZFS dataset $NAME/vms"
}

have_device_mapper() {
    modprobe -a dm-mod dm-thin-pool 2>/dev/null || true
    [ -e /dev/mapper/control ] && dmsetup targets 2>/dev/null | grep -q '^thin-pool'
}

require_device_mapper() {
    if ! have_device_mapper; then
        cat >&2 <<TXT
The LVM demo needs device-mapper with thin provisioning (dm-mod, dm-thin-pool), and this kernel
($(uname -r)) has none: there is no /dev/mapper/control. Nothing was started or created.
Try it in a throwaway VM that sees this checkout (Debian's kernel in QEMU, about half a minute
to boot): run \`.venv/bin/python -m tests.support.vm\` for a shell in the VM, then
\`make demo BACKEND=lvm &\` and the commands it prints. Or use \`make demo\` (ZFS).
TXT
        exit 1
    fi
}

setup_lvm() {
    if vgs "$NAME" >/dev/null 2>&1; then
        echo "volume group $NAME exists already (another demo running?); not touching it" >&2
        exit 1
    fi
    truncate -s 1G "$DEMO_DIR/lvm.img"
    LOOP=$(losetup --find --show "$DEMO_DIR/lvm.img")
    trap cleanup_lvm EXIT
    trap : INT TERM  # let fsrvpd stop on Ctrl-C, then clean up here
    vgcreate -q "$NAME" "$LOOP"
    lvcreate -q --type thin-pool -L 768M -n pool "$NAME"
    lvcreate -q -V 512M --thinpool pool -n vms "$NAME"
    mkfs.ext4 -q "/dev/$NAME/vms"
    mkdir -p "$DEMO_DIR/vms"
    mount "/dev/$NAME/vms" "$DEMO_DIR/vms"
    echo "created thin pool $NAME/pool on $LOOP ($DEMO_DIR/lvm.img), ext4 volume $NAME/vms at $DEMO_DIR/vms"
    STORE="thin LVM volume $NAME/vms"
}

cleanup_lvm() {
    echo "removing the LVM demo: mounts below $DEMO_DIR, volume group $NAME, $LOOP"
    awk -v dir="$DEMO_DIR/" 'index($5, dir) == 1 {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount
    vgremove -q -f "$NAME" || true
    pvremove -q -f "$LOOP" >/dev/null 2>&1 || true
    losetup -d "$LOOP" || true
    rm -rf "$DEMO_DIR/lvm.img" "$DEMO_DIR/vms" "$DEMO_DIR/state"
}

case "$BACKEND" in
    zfs) ;;
    lvm) require_device_mapper ;;
    *) echo "BACKEND must be zfs or lvm, not '$BACKEND'" >&2; exit 2 ;;
esac
mkdir -p "$DEMO_DIR"
"setup_$BACKEND"
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
    backend: $BACKEND
YAML

cat <<TXT

fsrvpd demo: share 'vms' on $STORE, embedded SMB server on 127.0.0.1:$PORT
Try, in another terminal:
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_get_sup_version'
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_is_path_sup vms'
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_create_expose backup ro vms'
  smbclient -p $PORT -U backup%backup -L 127.0.0.1
  smbclient -p $PORT -U backup%backup '//127.0.0.1/vms@{<shadow copy id printed above>}' -c 'get disk.vhdx -'
  rpcclient -p $PORT -U backup%backup 127.0.0.1 -c 'fss_delete vms <set id> <shadow copy id>'
Ctrl-C stops fsrvpd.

TXT
"$FSRVPD" run -c "$DEMO_DIR/fsrvpd.yaml"
