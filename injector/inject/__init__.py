"""Stage 4, the point of no return: entering the target's namespaces, and the ptrace
injection of execve into its PID 1 (one register table per architecture)."""
