"""The journal on disk: its format (``format``), its restore (``restore``).

See docs/journal.md and native/engine.h ("The journal on disk")."""
