"""Parameter shards: a stable layout of the flattened parameters, capacity bids in the DHT, and the
assignment of owners every peer computes alike from the same bids, and the owner-side outer step.
Uses ``dht`` and the frame format of ``averaging.wire``."""
