"""The Legion peer: host and DHT composition, lifecycle, membership, CLI."""
