"""The journal on disk (issue 22): the file writer (writer.py) and restore."""
