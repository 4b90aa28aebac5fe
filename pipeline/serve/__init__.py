"""``wanwu serve``: the recognition daemon (front doors, dynamic batching, supervision)."""
