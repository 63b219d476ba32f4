"""Run files: the schema (``schema``), the durable writer (``writer``), the reader (``reader``).

``open_run`` is the entry point for users; see ``schema`` for every name in a run file.
"""

from .reader import _allow_concurrent_readers, open_run, valid_snapshots
from .schema import VARIABLES, particle_subset
from .writer import RunWriter

__all__ = ["VARIABLES", "RunWriter", "_allow_concurrent_readers", "open_run", "particle_subset",
           "valid_snapshots"]
