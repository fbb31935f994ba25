"""The machinery every stage shares: config specs, errors, run artifacts and manifests, shards, tracking,
secrets, the run-folder lock, performance counters, and the stage contract (:mod:`alignkit.core.stage`)."""
