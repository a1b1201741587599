"""Apache Beam jobs: one module per parallel stage (prepare, encode, index, targets)."""
