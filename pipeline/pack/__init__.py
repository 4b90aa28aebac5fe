"""``wanwu pack``: packing folders into LMDB archives (optionally with smaller JPEGs)."""
