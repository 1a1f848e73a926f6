"""What every layer may use: ``distributed`` (the one place that knows torch.distributed: process group,
FSDP2 wrapping, collectives), ``files`` (atomic writes, fsync, what a failed write means), ``tracking``
(metrics.jsonl and the optional TensorBoard / W&B / trackio sinks), ``memory`` (peak memory measurement).

The bottom layer: imports nothing of posttrain outside ``runtime``.
"""
