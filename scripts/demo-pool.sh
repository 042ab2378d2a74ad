# Sourced by demo.sh and demo-samba.sh: the demo's file-backed ZFS pool and its dataset for share
# `vms` (with a file in it), created once under $DEMO_DIR and reused (imported) afterwards.
POOL=${DEMO_POOL:-fsrvpdemo}
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

