"""Beside the pipeline, the rehearsal: a sandbox of new namespaces whose PID 1 is a
stand-in init, so the whole switch can run against it instead of the host's PID 1."""
