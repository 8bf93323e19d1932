"""The worker side, free of I/O: the object store and the request handler."""

from .node import Node
from .store import Failure, ObjectStore

__all__ = ["Node", "ObjectStore", "Failure"]
