"""mert-indexer: index music catalogues with MERT embeddings served by Triton.

This package is the shared core that every part imports and that imports
nothing else of the project: the model contract (:mod:`mert_indexer.contract`),
the exception hierarchy (:mod:`mert_indexer.errors`), atomic file writes
(:mod:`mert_indexer.atomic`), the defaults shared by server and client
(:mod:`mert_indexer.defaults`) and the progress bar of long work
(:mod:`mert_indexer.progress`). The parts live in subpackages, one folder of the
repository each, and depend on the core, never the other way round::

    mert_indexer            core/      contract, errors, atomic writes
    mert_indexer.client     client/    decode, window, Triton I/O, pipeline, CLIs
    mert_indexer.indexer    indexer/   catalog + segments, FAISS, search, merge
    mert_indexer.server     server/    the bundled Triton launcher (indexer-serve)
    mert_indexer.service    service/   the HTTP search service (indexer-search-serve)

``export/`` (the ONNX exporter, ``python export/to_onnx.py``) is not installed;
it imports the core and the client like any other user.
"""

__version__ = "0.1.0"
