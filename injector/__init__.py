"""docker-boot's engine: everything on the host side, up to and including the point of no return.

This package never imports Textual; both front-ends in ``app`` render its events.
"""
