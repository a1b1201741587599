"""The artifact layer: params, stores, manifests, shard markers, lineage and verify.

Nothing here imports torch or Beam, so every stage and tool can use it.
"""
