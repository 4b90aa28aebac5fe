"""``wanwu run``: the batch job (its ledger, sink and progress) over the topology."""
