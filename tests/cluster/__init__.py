"""A cluster in a box: simulated nodes on this machine for multi-node tests."""
