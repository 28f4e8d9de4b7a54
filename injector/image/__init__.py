"""Stage 1, the image: sources (engine, docker-archive, rootfs tar), the scan into an
index, and the fast, safe copy-in."""
