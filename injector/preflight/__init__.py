"""Stage 2, the preflight: facts about the host, the image and PID 1, then blockers and
warnings (the process table, whether the init can run here)."""
