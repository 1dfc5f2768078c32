"""Generators of the files shipped beside the code: man pages and shell completion."""
