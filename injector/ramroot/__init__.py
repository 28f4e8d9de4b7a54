"""Stage 3, the RAM root: the tmpfs, the host files and the kernel's modules that go into it."""
