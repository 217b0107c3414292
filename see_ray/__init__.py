"""see-ray: SEE (Sequential Ensemble of Experts) continual learning for LLMs, trained and served on Ray.

Subpackages by role:

- ``config``    every typed config (one base class, one YAML/override loader) and the shared names;
- ``core``      the SEE method in one process, without Ray (data, prompts, rehearsal, model, expert, routing,
                training loop, metrics);
- ``training``  one expert trained on Ray Train + DeepSpeed, and the add-expert pipeline run as a Ray job;
- ``registry``  the expert registry and the storage it lives on;
- ``serve``     Ray Serve: model replicas, the Ray-free walk, the dispatcher's HTTP ingress, deployment,
                live changes;
- ``tools``     the ``see-ray`` CLI, the demo, the quality benchmark, status, the built-in tasks and pools.
"""

__version__ = "0.1.0"
