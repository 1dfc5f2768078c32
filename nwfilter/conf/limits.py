"""The size limit of the documents the engine reads.

Apart from the parser (`nwfilter.conf.safexml`, which holds the other
limits) so that the command line can bound what it reads from a file
without loading lxml.
"""

from __future__ import annotations

#: the largest document the parsers accept, in bytes
MAX_DOCUMENT_BYTES = 1024 * 1024
