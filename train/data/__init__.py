"""Training data: the shard format, packing, and converters from episodes and videos."""
