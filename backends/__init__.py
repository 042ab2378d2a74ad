"""Storage backends: each turns shares into file stores and shadow copies into snapshots."""
