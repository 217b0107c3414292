"""What users run: the ``see-ray`` CLI, the demo, the quality benchmark, ``see-ray status``, the registry and
serve commands, and the built-in tasks and general pools (``builtin``)."""
