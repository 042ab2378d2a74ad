"""fsrvpd: an MS-FSRVP (File Server Remote VSS Protocol) server for ZFS and LVM backed shares."""

__version__ = "0.1.0"
