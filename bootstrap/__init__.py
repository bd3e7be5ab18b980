"""Joining a swarm: dialing bootstrap peers."""
