"""The graceful stop (issue 19): before the point of no return, the host's own init stops its
services the way their makers meant, in its dependency order, with their stop commands and
timeouts; the init stage's signals then end only what is left.

``plan``     what would stop, in which order, each unit's timeout, the worst case, what stays
``systemd``  reading systemd's units, stopping them in one job transaction, starting them again
``sysv``     sysvinit's init scripts, in the order of their K links
``runit``    runit's supervised services (``sv stop``)
``run``      the switch's step: the host's stop (or the rehearsal's stand-in), and its undo
"""
