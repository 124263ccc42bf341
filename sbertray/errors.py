"""The one base class for errors a user fixes from the message alone.

The CLI and the ``jobs/`` entrypoints print a ``UserError`` as one line naming the file, row or
key, with no traceback, and exit 2; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad config, data, model reference, storage location or cluster for the job asked."""
