#!/usr/bin/env bash
# The production shape in one command: a private smbd on 127.0.0.1 port 1446 serves share `vms`
# (user backup / password backup, a member of BUILTIN\Backup Operators) over SMB3 and hands
# \PIPE\FssagentRpc to fsrvpd in samba mode; samba-dcerpcd serves the other pipes, without
# rpcd_fsrvp.  Ctrl-C stops fsrvpd, smbd and samba-dcerpcd.  Everything lives under $DEMO_DIR
# (the same pool as `make demo`; Samba's files in $DEMO_DIR/samba).
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-/var/tmp/fsrvpd-demo}
FSRVPD=${FSRVPD:-fsrvpd}
PORT=1446
LIBEXEC=/usr/libexec/samba
HERE=$(dirname "$0")
source "$HERE/demo-pool.sh"
chmod 0755 "$DEMO_DIR"
chmod 0777 "$DEMO_DIR/vms"  # smbd works as the logged-on user

SAMBA=$DEMO_DIR/samba
CONF=$SAMBA/smb.conf
mkdir -p "$SAMBA"/{pid,lock,state,cache,private,ncalrpc,log}
{
    cat <<CONF
# Written by scripts/demo-samba.sh: a private standalone smbd on 127.0.0.1:$PORT
[global]
    server role = standalone server
    workgroup = FSRVPDEMO
    netbios name = FSRVPD-DEMO
    interfaces = 127.0.0.1
    bind interfaces only = yes
    smb ports = $PORT
    server min protocol = SMB3
    load printers = no
    disable spoolss = yes
    pid directory = $SAMBA/pid
    lock directory = $SAMBA/lock
    state directory = $SAMBA/state
    cache directory = $SAMBA/cache
    private dir = $SAMBA/private
    ncalrpc dir = $SAMBA/ncalrpc
    passdb backend = tdbsam:$SAMBA/private/passdb.tdb
    log file = $SAMBA/log/%m.log
CONF
    echo "    # the lines of etc/samba/fsrvpd.conf:"
    grep -v '^#' "$HERE/../etc/samba/fsrvpd.conf" | sed '/^$/d; s/^/    /'
} > "$CONF"

printf 'backup\nbackup\n' | smbpasswd -c "$CONF" -s -a backup >/dev/null
net -s "$CONF" groupmap list | grep -q 'S-1-5-32-551' ||
    net -s "$CONF" groupmap add sid=S-1-5-32-551 unixgroup=backup type=builtin ntgroup="Backup Operators" >/dev/null
net -s "$CONF" sam listmem 'BUILTIN\Backup Operators' | grep -qi '\\backup$' ||
    net -s "$CONF" sam addmem 'BUILTIN\Backup Operators' backup >/dev/null
net -s "$CONF" conf showshare vms >/dev/null 2>&1 ||
    net -s "$CONF" conf addshare vms "$DEMO_DIR/vms" writeable=y guest_ok=n "Hyper-V virtual disks"

smbd -F --no-process-group -s "$CONF" >>"$SAMBA/log/smbd.out" 2>&1 &
SMBD=$!
"$LIBEXEC/samba-dcerpcd" -F --no-process-group -s "$CONF" "$LIBEXEC/rpcd_classic" "$LIBEXEC/rpcd_winreg" \
    "$LIBEXEC/rpcd_lsad" "$LIBEXEC/rpcd_epmapper" >>"$SAMBA/log/dcerpcd.out" 2>&1 &
DCERPCD=$!
trap 'kill $SMBD $DCERPCD 2>/dev/null; wait $SMBD $DCERPCD 2>/dev/null; echo "smbd and samba-dcerpcd stopped"' EXIT

cat > "$DEMO_DIR/fsrvpd-samba.yaml" <<YAML
# Written by scripts/demo-samba.sh
front_door:
  mode: samba
  smb_conf: $CONF
state_dir: $DEMO_DIR/state-samba
YAML

R="rpcclient -m SMB3 -p $PORT -U backup%backup 127.0.0.1"
cat <<TXT

fsrvpd demo behind Samba: smbd serves share 'vms' (ZFS dataset $POOL/vms) on 127.0.0.1:$PORT, SMB3 only
Try, in another terminal:
  $R -c 'fss_get_sup_version'
  $R -c 'fss_create_expose backup ro vms'
  smbclient -m SMB3 -p $PORT -U backup%backup -L 127.0.0.1
  smbclient -m SMB3 -p $PORT -U backup%backup '//127.0.0.1/vms@{<shadow copy id printed above>}' -c 'get disk.vhdx -'
  net -s $CONF conf list        # the snapshot share in Samba's registry
  $R -c 'fss_delete vms <set id> <shadow copy id>'
Ctrl-C stops fsrvpd, smbd and samba-dcerpcd.

TXT
"$FSRVPD" run -c "$DEMO_DIR/fsrvpd-samba.yaml"
