"""The cluster runner: ``wanwu run --ray``, the batch job's stages on a Ray cluster (a front door)."""
