"""The journal on disk (issue 22): its format (``format``), the file writer
(``writer``) and its restore (``restore``).

See docs/journal.md and native/engine.h ("The journal on disk")."""
