"""The tools beside the library: they use it, it never imports them.

``segments``: ``ls``, ``inspect``, ``rm`` and ``top`` (read segments raw);
``stress``: hammer shared slots from many processes, then verify every commit;
``bench``: the engine side by side with its peers (RawArray+Lock, Manager,
atomicshm, Redis).  ``python -m engine`` (``engine.cli``) puts them on one
command line.
"""
