"""Averaging: latency-aware groups through the DHT and a fault-tolerant butterfly all-reduce with
compressed tensors and error feedback."""
