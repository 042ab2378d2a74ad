#!/bin/sh
# vfs_shell_snap callouts with which Samba's own FSRVP server (rpcd_fsrvp) snapshots ZFS datasets
# for the benchmark: a snapshot plus a clone per share (zfs-fuse has no .zfs/snapshot directory).
#
#   samba-zfs-snap.sh CLONE_PARENT CLONE_DIR check  SHARE_PATH
#   samba-zfs-snap.sh CLONE_PARENT CLONE_DIR create SHARE_PATH            -> prints the clone's path
#   samba-zfs-snap.sh CLONE_PARENT CLONE_DIR delete SHARE_PATH CLONE_PATH
#
# smbrun appends the path arguments. Destroying the clone right after Samba unshares it fails with
# "dataset is busy" while rpcd_fsrvp still sits in it (this script starts with the clone as its
# working directory), so `delete` retries from / in a detached process and answers at once (see
# /work/shared/lab/samba/README.md); that favours Samba's timings slightly.
set -u
cd /
parent=$1 clones=$2 action=$3 base=$4

# The dataset mounted at a path, from the mount table (as fsrvpd finds it): listing every
# filesystem with `zfs list` costs zfs-fuse ~0.1 s per 100 datasets.
dataset_at() {
	awk -v path="$1" '$2 == path && $3 ~ /zfs/ { found = $1 } END { if (found == "") exit 1; print found }' /proc/self/mounts
}

case $action in
check)
	dataset_at "$base" >/dev/null
	;;
create)
	dataset=$(dataset_at "$base") || exit 1
	name=$(basename "$dataset")-$(date +%s%N)
	zfs snapshot "$dataset@$name" || exit 1
	zfs clone -o mountpoint="$clones/$name" "$dataset@$name" "$parent/$name" || { zfs destroy "$dataset@$name"; exit 1; }
	echo "$clones/$name"
	;;
delete)
	clone=$parent/$(basename "$5")
	origin=$(zfs get -H -o value origin "$clone") || exit 1
	setsid sh -c '
		for attempt in $(seq 100); do
			zfs destroy "$1" 2>/dev/null && { zfs destroy "$2"; rmdir "$3" 2>/dev/null; exit 0; }
			sleep 0.1
		done' retry "$clone" "$origin" "$5" </dev/null >/dev/null 2>&1 &
	;;
*)
	exit 2
	;;
esac
