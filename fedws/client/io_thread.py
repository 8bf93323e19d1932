"""The coordinator's IO thread, as the layers above the client see it.

The loop itself lives in :mod:`fedws.transport.io_thread` (links run on it); this module
keeps the client-side names where pointers, plans and the hook import them from.
"""

from ..transport.io_thread import IOThread, in_io_thread, wait

__all__ = ["IOThread", "wait", "in_io_thread"]
