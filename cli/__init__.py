"""The ``sandboxctl`` command line: the parser and each command (``main``), and exec, shell and
logs, which talk to the engine directly (``attach``)."""
