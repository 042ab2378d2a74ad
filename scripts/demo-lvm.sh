# Sourced by demo.sh for BACKEND=lvm: a thin pool on a loop file under $DEMO_DIR with an ext4
# volume mounted for share `vms` (with a file in it). `cleanup_lvm` removes all of it (demo.sh runs
# it when fsrvpd stops). Needs device-mapper: without it, stop before making anything.
VG=${DEMO_VG:-fsrvpdemo}

if ! { modprobe -a dm-mod dm-thin-pool 2>/dev/null; [ -e /dev/mapper/control ] &&
       dmsetup targets 2>/dev/null | grep -q '^thin-pool'; }; then
    cat >&2 <<TXT
The LVM demo needs device-mapper with thin provisioning (dm-mod, dm-thin-pool), and this kernel
($(uname -r)) has none: there is no /dev/mapper/control. Nothing was started or created.
Try it in a throwaway VM that sees this checkout (Debian's kernel in QEMU, about half a minute
to boot): run \`.venv/bin/python -m tests.support.vm\` for a shell in the VM, then
\`make demo BACKEND=lvm &\` there and the commands it prints. Or use \`make demo\` (ZFS).
TXT
    exit 1
fi
if vgs "$VG" >/dev/null 2>&1; then
    echo "volume group $VG exists already (another demo running?); not touching it" >&2
    exit 1
fi

cleanup_lvm() {
    echo "removing the LVM demo: mounts below $DEMO_DIR, volume group $VG, $LOOP"
    awk -v dir="$DEMO_DIR/" 'index($5, dir) == 1 {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount
    vgremove -q -f "$VG" || true
    pvremove -q -f "$LOOP" >/dev/null 2>&1 || true
    losetup -d "$LOOP" || true
    rm -rf "$DEMO_DIR/lvm.img" "$DEMO_DIR/vms" "$DEMO_DIR/state"
}

mkdir -p "$DEMO_DIR/vms"
truncate -s 1G "$DEMO_DIR/lvm.img"
LOOP=$(losetup --find --show "$DEMO_DIR/lvm.img")
trap cleanup_lvm EXIT
vgcreate -q "$VG" "$LOOP"
lvcreate -q --type thin-pool -L 768M -n pool "$VG"
lvcreate -q -V 512M --thinpool pool -n vms "$VG"
mkfs.ext4 -q "/dev/$VG/vms"
mount "/dev/$VG/vms" "$DEMO_DIR/vms"
echo "demo virtual disk, version 1" > "$DEMO_DIR/vms/disk.vhdx"
echo "created thin pool $VG/pool on $LOOP ($DEMO_DIR/lvm.img), ext4 volume $VG/vms at $DEMO_DIR/vms"
STORE="thin LVM volume $VG/vms"
