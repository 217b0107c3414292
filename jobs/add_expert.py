#!/usr/bin/env python
"""Ray job entry point: add one expert to the SEE sequence.

    ray job submit --working-dir . -- python jobs/add_expert.py --task data/shout --name shout \\
        --storage /shared/see-ray-storage [--workers 2] [--replace] [--set training.epochs=2]

The pipeline (validate, reconstruct, train on Ray Train + DeepSpeed, validate, register, deploy) is
``see_ray.training.add_expert``; an installed package runs the same with ``see-ray add-expert ...`` or
``python -m see_ray.training.add_expert ...``. Exit codes: 0 success; 1 training or validation failed (nothing
registered); 2 bad input (nothing written).
"""

import sys
from pathlib import Path

try:  # the package is normally pip-installed; from a bare checkout, import it from the repo root
    import see_ray  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from see_ray.training.add_expert import main

if __name__ == "__main__":
    sys.exit(main())
