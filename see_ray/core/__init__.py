"""The SEE method in one process, without Ray: task data, prompts and indicators, rehearsal and task
reconstruction, the base model, an expert's decide / generate, the routing rule, the training loop, and the
benchmark metrics. Everything distributed (``training``, ``serve``) is built on these modules."""
