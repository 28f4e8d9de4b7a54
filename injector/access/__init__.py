"""Staying reachable across a switch: what the machine's network and SSH access are
(``facts``), and what of them goes into the new root (``carry``)."""
