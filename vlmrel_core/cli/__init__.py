"""`vlmrel`: parse arguments, call the library, print (JSON on stdout, progress and errors on stderr)."""
