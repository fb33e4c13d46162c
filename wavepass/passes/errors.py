"""Why a pass declined to rewrite a graph. The backend turns each into one plain-Inductor fallback."""


class CannotCache(Exception):
    """The pass cannot prove that a cached program would equal the original one."""


class NoRepeatedBlocks(CannotCache):
    """The graph holds no stack of two or more repeated blocks."""


class UnsafeCut(CannotCache):
    """Blocks were found, but skipping the remaining ones would not be a correct program."""
