"""Front doors: how SMB clients reach the FSRVP pipe and the snapshot shares."""
