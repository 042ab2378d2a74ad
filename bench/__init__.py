"""Benchmarks and long-running checks; `python -m bench` (make bench): fsrvpd against Samba's own FSRVP server."""
