"""What ships with fourbit but is not the library: the ``fourbit`` command (``cli``), the demo
(``demo``, with its retrieval set in ``data/``) and the kernel benchmark table (``bench``)."""
