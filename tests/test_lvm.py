"""The LVM backend on real device-mapper, and the whole daemon on LVM shares: these tests run inside
the throwaway VM (tests.support.vm boots one for all of them; on the host each reports its guest
outcome). Nothing of lvm2, the file systems, the SMB server or the clients is imitated.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import pytest

from fsrvpd.backends.base import BackendError, NotSupported, ShadowCopyRef
from fsrvpd.backends.lvm import COPY_TAG, SET_TAG, LvmBackend, SnapshotSize, snapshot_lv_name
from fsrvpd.runner import CommandRunner
from tests.support.lvm import LvmDaemon, LvmLab, Volume, run
from tests.test_e2e_rpcclient import create_expose, delete
from tests.test_zfs_backend import assert_refuses_writes, assert_writable_until_made_read_only, read, write

pytestmark = pytest.mark.vm

NOT_SUPPORTED = "0x8004230c"


def backend_for(lab: LvmLab, sizes: dict[str, str] | None = None) -> LvmBackend:
    """A backend exposing under the lab's directory, with classic snapshot sizes per share path."""
    parsed = {path: SnapshotSize.parse(size) for path, size in (sizes or {}).items()}
    return LvmBackend(CommandRunner(), mount_root=os.path.join(lab.directory, "exposed"), snapshot_size=parsed.get)


def copies_of(backend: LvmBackend, volumes: list[Volume]) -> list[ShadowCopyRef]:
    """One shadow copy set over the shares on `volumes`."""
    set_id = uuid.uuid4()
    return [ShadowCopyRef(set_id, uuid.uuid4(), backend.file_store(volume.mountpoint)) for volume in volumes]


def attr_of(lab: LvmLab, copy: ShadowCopyRef) -> str:
    lv = snapshot_lv_name(copy).split("/")[1]
    return next(attr for name, attr in lab.lvs("lv_name,lv_attr") if name == lv)


def assert_nothing_left(lab: LvmLab, backend: LvmBackend) -> None:
    assert lab.ours() == []
    assert lab.mounts_below(backend.mount_root) == []


# -- file_store --------------------------------------------------------------------------------

def test_file_store_is_the_volume_mounted_at_the_path(lvm):
    thin, classic = lvm.volumes["vms"], lvm.volumes["files"]
    backend = backend_for(lvm)
    store = backend.file_store(thin.mountpoint)
    assert (store.backend, store.name, store.group, store.mountpoint) == ("lvm", thin.name, f"{lvm.vg}/pool",
                                                                          thin.mountpoint)
    assert backend.file_store(thin.mountpoint, configured=thin.name) == store
    assert (backend.file_store(classic.mountpoint).group, lvm.volumes["sql"].fstype) == (lvm.vg, "xfs")
    assert lvm.ours() == []


def test_file_store_refuses_what_a_snapshot_would_not_hold(lvm):
    vms, db = lvm.volumes["vms"], lvm.volumes["sql"]
    backend = backend_for(lvm)
    os.mkdir(os.path.join(vms.mountpoint, "disk1"))
    with pytest.raises(NotSupported, match="directory inside"):
        backend.file_store(os.path.join(vms.mountpoint, "disk1"))
    with pytest.raises(NotSupported, match=f"mounted at {db.mountpoint}, not at {vms.mountpoint}"):
        backend.file_store(vms.mountpoint, configured=db.name)
    with pytest.raises(NotSupported, match="no logical volume named"):
        backend.file_store(vms.mountpoint, configured=f"{lvm.vg}/absent")
    below = os.path.join(vms.mountpoint, "scratch")
    os.mkdir(below)
    run("mount", "-t", "tmpfs", "tmpfs", below)
    with pytest.raises(NotSupported, match="tmpfs at .*scratch"):
        backend.file_store(vms.mountpoint)
    with pytest.raises(NotSupported, match="not an LVM logical volume"):
        backend.file_store(below)
    run("umount", below)
    run("umount", db.mountpoint)
    with pytest.raises(NotSupported, match="is not mounted"):
        backend.file_store(db.mountpoint, configured=db.name)
    lvm.mount(db)
    assert lvm.ours() == []


# -- snapshot, expose, make_read_only ---------------------------------------------------------

def test_thin_set_of_ext4_and_xfs_serves_the_old_bytes_read_only(lvm):
    volumes = [lvm.volumes["vms"], lvm.volumes["sql"]]
    backend = backend_for(lvm)
    for volume in volumes:
        write(os.path.join(volume.mountpoint, "data"), f"before {volume.fstype}")
    copies = copies_of(backend, volumes)
    backend.snapshot(copies)
    for volume in volumes:
        write(os.path.join(volume.mountpoint, "data"), "after")

    tags = dict(lvm.lvs("lv_name,lv_tags"))
    for copy, volume in zip(copies, volumes):
        assert tags[snapshot_lv_name(copy).split("/")[1]] == f"{COPY_TAG}{copy.copy_id},{SET_TAG}{copy.set_id}"
        exposed = backend.expose(copy, writable=False)
        assert exposed == os.path.join(backend.mount_root, str(copy.copy_id))
        assert read(os.path.join(exposed, "data")) == f"before {volume.fstype}"
        assert_refuses_writes(exposed)
        assert backend.expose(copy, writable=False) == exposed
        assert attr_of(lvm, copy)[1] == "r"  # the LV itself is read-only, not only the mount
    for copy in copies:
        backend.remove(copy)
        backend.remove(copy)
    assert_nothing_left(lvm, backend)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_writable_exposure_takes_writes_until_made_read_only(lvm, fstype):
    volume = lvm.volumes["vms" if fstype == "ext4" else "sql"]
    backend = backend_for(lvm)
    [copy] = copies_of(backend, [volume])
    backend.snapshot([copy])
    assert_writable_until_made_read_only(backend, copy)
    assert attr_of(lvm, copy)[1] == "r"
    assert not os.path.exists(os.path.join(volume.mountpoint, "recovered"))
    backend.remove(copy)
    assert_nothing_left(lvm, backend)


def classic_snapshot(lab: LvmLab, size: str) -> tuple[Volume, LvmBackend, ShadowCopyRef]:
    """A snapshot of `files` (classic) of the given size, taken when its file `data` said "before"."""
    volume = lab.volumes["files"]
    backend = backend_for(lab, {volume.mountpoint: size})
    write(os.path.join(volume.mountpoint, "data"), "before")
    [copy] = copies_of(backend, [volume])
    backend.snapshot([copy])
    return volume, backend, copy


def test_classic_snapshot_has_the_configured_size_and_the_old_bytes(lvm):
    volume, backend, copy = classic_snapshot(lvm, "25%")
    write(os.path.join(volume.mountpoint, "data"), "after")
    lv = snapshot_lv_name(copy).split("/")[1]
    assert dict(lvm.lvs("lv_name,lv_size"))[lv] == str(16 << 20)
    assert read(os.path.join(backend.expose(copy, writable=False), "data")) == "before"
    assert backend.usage(copy)["snapshot"] >= 0
    backend.remove(copy)
    assert_nothing_left(lvm, backend)


def test_classic_snapshots_beyond_the_free_space_make_nothing(lvm):
    thin, classic = lvm.volumes["vms"], lvm.volumes["files"]
    backend = backend_for(lvm, {classic.mountpoint: "4G"})
    copies = copies_of(backend, [thin, classic])
    with pytest.raises(BackendError, match=f"volume group {lvm.vg} has .* free") as failure:
        backend.snapshot(copies)
    assert failure.value.out_of_space
    assert lvm.ours() == []


def test_failure_half_way_removes_what_the_call_made_and_spares_an_untagged_volume(lvm):
    first, second = lvm.volumes["vms"], lvm.volumes["sql"]
    backend = backend_for(lvm)
    copies = copies_of(backend, [first, second])
    squatter = snapshot_lv_name(copies[1]).split("/")[1]
    run("lvcreate", "-q", "-V", "8M", "--thinpool", "pool", "-n", squatter, lvm.vg)  # not ours: no tags
    with pytest.raises(BackendError, match="already exists"):
        backend.snapshot(copies)
    assert lvm.ours() == [squatter]
    with pytest.raises(BackendError, match="does not carry fsrvpd's tags"):
        backend.remove(copies[1])
    assert lvm.ours() == [squatter]


def test_overflowed_classic_snapshot_is_reported_refused_and_unreadable(lvm):
    volume, backend, copy = classic_snapshot(lvm, "4M")
    exposed = backend.expose(copy, writable=False)
    assert backend.failing([copy]) == {}
    with open(os.path.join(volume.mountpoint, "filler"), "wb") as filler:  # more than the COW area holds
        filler.write(os.urandom(16 << 20))
    os.sync()

    reason = backend.failing([copy])[copy.copy_id]
    assert "overflowed" in reason
    assert attr_of(lvm, copy)[4] == "I"
    with pytest.raises(BackendError, match="overflowed"):
        backend.expose(copy, writable=False)
    write("/proc/sys/vm/drop_caches", "3")
    with pytest.raises(OSError):
        read(os.path.join(exposed, "data"))
    backend.remove(copy)
    assert_nothing_left(lvm, backend)


def test_continuous_writes_during_commit_leave_clean_snapshot_file_systems(lvm):
    """lvm2 freezes each origin while it suspends it; without a second fsfreeze that is enough.

    A frozen ext4 has an empty journal. A frozen xfs has a "covered" log (one dummy transaction
    holding the superblock counters), which xfs_repair -n reports as unreplayed changes, so the
    xfs snapshot is mounted once (log replayed) before the check.
    """
    volumes = list(lvm.volumes.values())
    backend = backend_for(lvm)
    copies = copies_of(backend, volumes)
    stop = threading.Event()

    def keep_writing(directory: str) -> None:
        chunk = os.urandom(64 << 10)
        for number in range(10 ** 6):
            if stop.is_set():
                return
            with open(os.path.join(directory, f"file{number % 50}"), "wb") as out:
                out.write(chunk)
                if number % 5 == 0:
                    os.fsync(out.fileno())

    writers = [threading.Thread(target=keep_writing, args=(volume.mountpoint,)) for volume in volumes]
    for writer in writers:
        writer.start()
    try:
        backend.snapshot(copies)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    for copy, volume in zip(copies, volumes):
        device = f"/dev/{snapshot_lv_name(copy)}"
        if volume.thin:  # lvm2 leaves thin snapshots inactive; classic ones are active from the start
            run("lvchange", "-ay", "-K", snapshot_lv_name(copy))
        if volume.fstype == "xfs":
            replayed = os.path.join(lvm.directory, "replay")
            os.makedirs(replayed, exist_ok=True)
            run("mount", "-o", "nouuid", device, replayed)
            run("umount", replayed)
        check = ["fsck.ext4", "-n", "-f", device] if volume.fstype == "ext4" else ["xfs_repair", "-n", device]
        proc = subprocess.run(check, capture_output=True, text=True)
        assert proc.returncode == 0, f"{volume.fstype} snapshot not clean:\n{proc.stdout}{proc.stderr}"
    for copy in copies:
        backend.remove(copy)
    assert_nothing_left(lvm, backend)


def test_owned_finds_every_snapshot_and_remove_owned_cleans_it(lvm):
    volumes = [lvm.volumes["vms"], lvm.volumes["files"]]
    backend = backend_for(lvm)
    copies = copies_of(backend, volumes)
    backend.snapshot(copies)
    exposed = backend.expose(copies[0], writable=True)
    found = [obj for obj in backend.owned() if obj.name.startswith((lvm.vg + "/", backend.mount_root))]
    assert [(obj.kind, obj.name, obj.copy_id) for obj in found] == \
        [("mount", exposed, copies[0].copy_id)] + sorted(("snapshot", snapshot_lv_name(copy), copy.copy_id)
                                                         for copy in copies)
    assert {obj.set_id for obj in found} == {copies[0].set_id}
    backend.remove_owned(found[0])  # the exposure alone: the snapshot stays
    assert lvm.mounts_below(backend.mount_root) == [] and len(lvm.ours()) == len(copies)
    for obj in found[1:]:
        backend.remove_owned(obj)
    assert_nothing_left(lvm, backend)


# -- the daemon on LVM shares, driven by Samba's rpcclient and smbclient --------------------------

@pytest.fixture(scope="module")
def lvm_daemon(lvm_lab, tmp_path_factory, samba_clients):
    """One fsrvpd (starting one costs half a minute in the emulated guest) for the cycles below."""
    running = LvmDaemon(lvm_lab, tmp_path_factory.mktemp("daemon")).start()
    yield running
    running.stop()
    lvm_lab.reset()


def assert_daemon_left_nothing(daemon: LvmDaemon) -> None:
    assert daemon.removals_done() and daemon.pool.ours() == []
    assert daemon.pool.mounts_below(daemon.config["mount_root"]) == []


def test_rpcclient_read_only_cycle_on_thin_and_classic_volumes(lvm_daemon, tmp_path):
    daemon = lvm_daemon
    for share in ("vms", "sql", "files"):
        write(os.path.join(daemon.paths[share], "disk.vhdx"), f"{share} before the commit\n")
    set_id, copies = create_expose(daemon, "ro", "vms", "sql", "files")
    for share in ("vms", "sql", "files"):
        write(os.path.join(daemon.paths[share], "disk.vhdx"), "after the commit, longer\n")

    local = tmp_path / "local.txt"
    local.write_text("x")
    for share, copy_id in copies.items():
        seen = daemon.smbclient(f"{share}@{{{copy_id}}}", f"get disk.vhdx -; put {local} new.txt")
        assert f"{share} before the commit" in seen and "NT_STATUS_ACCESS_DENIED" in seen, seen
    assert "after the commit" in daemon.smbclient("vms", "get disk.vhdx -")

    deleted = daemon.rpcclient(*(f"fss_delete {share} {set_id} {copy_id}" for share, copy_id in copies.items()))
    assert deleted.count("shadow-copy deleted") == len(copies), deleted
    assert_daemon_left_nothing(daemon)


def test_rpcclient_auto_recovery_cycle_writes_until_recovery_complete(lvm_daemon, tmp_path):
    daemon = lvm_daemon
    local = tmp_path / "local.txt"
    local.write_text("written by a VSS writer during recovery\n")
    set_id, copies = create_expose(daemon, "rw", "vms")
    share = f"vms@{{{copies['vms']}}}"

    daemon.smbclient(share, f"put {local} recovered.txt")
    assert daemon.ctl("prune").returncode == 0  # a reconciliation finds the writable exposure and keeps it
    assert "written by a VSS writer" in daemon.smbclient(share, "get recovered.txt -")
    assert not os.path.exists(os.path.join(daemon.paths["vms"], "recovered.txt"))

    assert "marked recovery complete" in daemon.rpcclient(f"fss_recovery_complete {set_id}")
    assert "NT_STATUS_ACCESS_DENIED" in daemon.smbclient(share, f"put {local} late.txt")
    assert "late.txt" not in daemon.smbclient(share, "ls")
    snapshot = next(name for name, _ in daemon.pool.lvs("lv_name,lv_attr") if copies["vms"] in name)
    assert dict(daemon.pool.lvs("lv_name,lv_attr"))[snapshot][1] == "r"

    delete(daemon, set_id, copies)
    assert_daemon_left_nothing(daemon)


def test_share_that_is_not_a_volume_root_is_not_supported_and_nothing_is_made(lvm_daemon):
    assert NOT_SUPPORTED in lvm_daemon.rpcclient("fss_is_path_sup inner").lower()
    assert NOT_SUPPORTED in lvm_daemon.rpcclient("fss_create_expose backup ro inner").lower()
    assert_daemon_left_nothing(lvm_daemon)


def test_overflowed_classic_snapshot_share_is_withdrawn(lvm_daemon):
    daemon = lvm_daemon
    set_id, copies = create_expose(daemon, "ro", "files")
    share = f"files@{{{copies['files']}}}"
    assert "blocks of size" in daemon.smbclient(share, "ls")
    with open(os.path.join(daemon.paths["files"], "filler"), "wb") as filler:  # the share has an 8M COW area
        filler.write(os.urandom(24 << 20))
    os.sync()
    for _ in range(60):
        listing = daemon.smbclient(share, "ls")
        if "NT_STATUS_BAD_NETWORK_NAME" in listing:
            break
        time.sleep(1)
    assert "NT_STATUS_BAD_NETWORK_NAME" in listing, daemon.log()
    assert "overflowed" in daemon.log()
    os.remove(os.path.join(daemon.paths["files"], "filler"))
    delete(daemon, set_id, copies)
    assert_daemon_left_nothing(daemon)
