"""The journal on disk (durability): the file writer (``writer``), the format
and its codec (``format``, ``frames``), restore (``restore``), and the
``journal`` command (``journal_cli``).

See docs/durability.md and native/engine.h ("The journal on disk")."""
