"""Research and command-line tooling built on the library: the ``rotatekv`` command (``cli``),
the perplexity evaluation (``eval``, ``methods``), the end-to-end benchmark (``bench``), the
demos, and the packaged models and texts they run on (``models``, ``text``).

The library (everything outside this package) never imports it."""
