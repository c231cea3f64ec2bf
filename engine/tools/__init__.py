"""The tools beside the library: they use it, it never imports them.

``segments``: ``ls``, ``inspect``, ``rm`` and ``top`` (read segments raw).
``python -m engine`` (``engine.cli``) puts them on one command line.
"""
