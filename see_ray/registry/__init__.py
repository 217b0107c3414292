"""The expert registry and the storage it lives on.

- ``storage``: one storage URI (a local folder, NFS, ``s3://``, ``gs://``, any pyarrow/fsspec file system) with
  atomic writes;
- ``registry``: the registry document (experts in sequence order, their versions, thresholds and rehearsal
  samples) and the atomic add / replace / disable / remove / purge operations;
- ``locks``: the lock that serializes writers (flock for local/NFS roots, a Ray actor's lease for object stores);
- ``errors``: the registry's errors.

The registry's public names are re-exported here (``from see_ray.registry import Registry``).
"""

from see_ray.registry.errors import (
    BaseModelMismatch,
    ConcurrentModification,
    ExpertExists,
    RegistryError,
    RegistryLockTimeout,
)
from see_ray.registry.locks import ActorLock, FileLock
from see_ray.registry.registry import (
    FAULT_ENV,
    REGISTRY_FILE,
    BaseModelIdentity,
    Event,
    ExpertRecord,
    Indicators,
    NewExpert,
    Registry,
    RegistryDoc,
    ThresholdChange,
    check_served_base,
    fault_point,
    format_sequence,
    sha256_file,
)

__all__ = [
    "FAULT_ENV", "REGISTRY_FILE", "BaseModelIdentity", "BaseModelMismatch", "ConcurrentModification", "Event",
    "ExpertExists", "ExpertRecord", "FileLock", "ActorLock", "Indicators", "NewExpert", "Registry", "RegistryDoc", "RegistryError", "ThresholdChange",
    "RegistryLockTimeout", "check_served_base", "fault_point", "format_sequence", "sha256_file",
]
