"""The expert registry: the one source of truth for the ordered expert sequence.

Layout under the storage root (see registry/storage.py for what a root can be)::

    registry.json                          the document below (the commit point of every change)
    adapters/<name>/v<N>/                  PEFT adapter folder (safetensors) + see_meta.json
    rehearsal/<task>/<name>.v<N>.json      the rehearsal samples that expert version added for its task
    registry.lock                          lock file (local / NFS roots only)

``registry.json`` holds, in sequence order (oldest first; routing reverses it for newest-first), one record
per expert with everything needed to serve and audit it: name, task, version, sequence position, status,
adapter URI and hash, base-model identity and fingerprint, indicator tokens, calibrated threshold, training
config and figures, validation figures, the tasks it was trained to reject, its rehearsal file, creation time
and the job that made it. Replaced versions and removed experts move to ``retired`` (their files stay unless
purged), and every change is appended to ``events``.

Crash safety ("a job killed at any point leaves the registry exactly as before"):
- files are written BEFORE the document that references them, and deleted only AFTER the document stopped
  referencing them; the document itself is replaced atomically (storage.write_text_atomic). A kill at any
  point therefore leaves either the old document or the new one, never a reference to a half-written file.
  The worst a kill leaves is an unreferenced folder, which the next writer of that version overwrites.
- versions and positions are assigned inside the lock, from the document, so a re-run after a kill picks
  the same free version and simply overwrites the orphan.

Serialization of concurrent writers (two jobs at once): every change is a read-modify-write of the document
inside ``_transaction``, which holds a lock (registry/locks.py):
- local and NFS roots use ``flock`` on ``registry.lock``. Why a file lock rather than a Ray actor: it needs
  no running cluster (CLI and local development), the kernel releases it the instant the holder dies (a job
  killed with SIGKILL can never leave a stale lock), and on NFS Linux maps flock onto NFS byte-range locks,
  which covers the multi-node shared-path case.
- object stores (s3://, gs://) have no locks and pyarrow exposes no conditional PUT, so there the lock is a
  named detached Ray actor (one per storage URI) granting a lease that the holder renews while it works; a
  killed holder stops renewing and its lease expires after ``lease_s``. Writers must then run in the same
  Ray cluster (jobs do; the CLI connects via RAY_ADDRESS).
- as a fence against a lease that expired while its holder was still writing, the generation number of the
  document is re-read just before the swap and the write is refused if it moved.
The order of the sequence is the order in which additions committed: each gets ``position =
next_position`` (monotonic, never reused), recorded in the record and in the event log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from see_ray.core.data import validate_name
from see_ray.core.rehearsal import RehearsalBuffer
from see_ray.registry.errors import (
    BaseModelMismatch,
    ConcurrentModification,
    ExpertExists,
    RegistryError,
)
from see_ray.registry.locks import ActorLock, FileLock, now_iso
from see_ray.registry.storage import Storage

REGISTRY_FILE = "registry.json"
LOCK_FILE = "registry.lock"
FORMAT = 1
MAX_EVENTS = 1000


def _name(name: str, what: str = "expert name") -> str:
    """validate_name as a RegistryError: every entry point (job, CLI, API, serve helpers) passes through here
    before a name becomes part of a path, a Serve application name or a lookup."""
    try:
        return validate_name(name, what)
    except ValueError as e:
        raise RegistryError(str(e)) from None


def _fp(fingerprint: str) -> str:
    return fingerprint[:12]


def check_served_base(records: "list[ExpertRecord]", fingerprint: str, served: str) -> None:
    """Refuse to serve adapters trained on another base than the one served (``fingerprint`` of ``served``).

    Same-shaped bases (two fine-tunes of one architecture) would load such an adapter without complaint and
    answer garbage, so this compares the base checkpoints' content fingerprints, not their names."""
    bad = [r for r in records if r.base_model.fingerprint != fingerprint]
    if bad:
        which = ", ".join(f"{r.name} (base {r.base_model.name_or_path}, fingerprint {_fp(r.base_model.fingerprint)})"
                          for r in bad)
        raise BaseModelMismatch(
            f"refusing to serve expert(s) trained on another base model: {which}; the served base {served} has "
            f"fingerprint {_fp(fingerprint)}. Serve their base model, or disable them (see-ray registry disable NAME)"
        )


# Test hook for fault-injection tests: SEE_RAY_FAULT_PAUSE="point[,point...]:seconds" makes the process print a
# marker and sleep at the named points, so that a test can kill it (or break its storage) exactly there.
# Points: "register" (job: before registration), "commit" (registry: files written, document not yet swapped).
FAULT_ENV = "SEE_RAY_FAULT_PAUSE"


def fault_point(point: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    points, _, seconds = spec.rpartition(":")
    if point in points.split(","):
        print(f"[fault] paused at {point} pid {os.getpid()} for {seconds} s", flush=True)
        time.sleep(float(seconds))


class _Doc(BaseModel):
    # "allow": a document written by a newer version keeps its extra fields when an older one rewrites it.
    model_config = ConfigDict(extra="allow")


class BaseModelIdentity(_Doc):
    """Which frozen base an adapter belongs to: an adapter must never be served on another base."""

    name_or_path: str = Field(description="model.name_or_path as configured when the expert was trained.")
    fingerprint: str = Field(description="sha256 over the base checkpoint's config and weight files.")


class Indicators(_Doc):
    accept: str = Field(description="Text of the ACCEPT token.")
    reject: str = Field(description="Text of the REJECT token.")
    accept_id: int | None = Field(None, description="Its id in the base vocabulary.")
    reject_id: int | None = Field(None, description="Its id in the base vocabulary.")


class ThresholdChange(_Doc):
    """One entry of an expert's threshold history: the value, when, why, and its operating point."""

    threshold: float | None
    at: str = Field(description="UTC time (ISO 8601).")
    reason: str = Field(description="'registered', or why it was re-calibrated.")
    calibration: dict[str, Any] | None = Field(None, description="core.routing.Calibration of this value, if any.")


class ExpertRecord(_Doc):
    """One expert version."""

    name: str = Field(description="Expert name (unique in the sequence; also its deployment name).")
    task: str = Field(description="Task the expert serves; its rehearsal samples are filed under it.")
    version: int = Field(ge=1, description="1 for the first training under this name, +1 per --replace.")
    position: int = Field(ge=1, description="Commit order; the sequence is sorted by it (oldest first).")
    status: Literal["active", "disabled", "replaced", "removed"] = Field(
        "active", description="active/disabled: in the sequence; replaced/removed: retired, files kept."
    )
    adapter_uri: str = Field(description="Folder of the PEFT adapter (safetensors) under the storage root.")
    adapter_sha256: str = Field(description="sha256 of adapter_model.safetensors, checked when loading.")
    base_model: BaseModelIdentity
    indicators: Indicators
    threshold: float | None = Field(None, description="Calibrated acceptance threshold on p(ACCEPT).")
    calibration: dict[str, Any] | None = Field(
        None, description="The operating point the threshold was chosen at, on held-out data (core.routing."
        "Calibration: threshold, false_rejection, false_acceptance, n_positives, n_negatives, negatives_by_source).")
    threshold_history: list[ThresholdChange] = Field(
        default_factory=list, description="Every threshold this version has had, oldest first (a threshold is a "
        "scalar: re-calibrating it retrains nothing).")
    definition: str | None = Field(None, description="The task's instruction text.")
    trained_against: list[str] = Field(
        default_factory=list, description="Tasks whose rehearsal queries were negatives in its training set."
    )
    rehearsal_uri: str | None = Field(None, description="File with the rehearsal samples it added.")
    rehearsal_count: int = Field(0, description="How many rehearsal samples it added for its task.")
    training: dict[str, Any] = Field(default_factory=dict, description="Training config and figures.")
    validation: dict[str, Any] = Field(default_factory=dict, description="Validation figures at registration.")
    created_at: str = Field(description="UTC time of registration (ISO 8601).")
    job: dict[str, Any] = Field(default_factory=dict, description="Who registered it (job id, host, pid).")


class Event(_Doc):
    generation: int
    time: str
    op: str
    name: str
    version: int | None = None
    position: int | None = None
    detail: str | None = None


class RegistryDoc(_Doc):
    format: int = Field(FORMAT, description="Document format version.")
    generation: int = Field(0, description="Incremented by every committed change.")
    next_position: int = Field(1, description="Position the next committed expert gets (never reused).")
    experts: list[ExpertRecord] = Field(default_factory=list, description="The sequence, oldest first.")
    retired: list[ExpertRecord] = Field(default_factory=list, description="Replaced versions, removed experts.")
    events: list[Event] = Field(default_factory=list, description="Change log (last 1000).")

    def find(self, name: str) -> ExpertRecord | None:
        return next((e for e in self.experts if e.name == name), None)

    def sequence(self, include_disabled: bool = True) -> list[ExpertRecord]:
        return [e for e in self.experts if include_disabled or e.status == "active"]

    def versions_of(self, name: str) -> list[int]:
        return [e.version for e in (*self.experts, *self.retired) if e.name == name]


class NewExpert(BaseModel):
    """What a job hands to ``Registry.add``: the finished adapter and the facts to record with it."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    task: str
    adapter_dir: str = Field(description="Local folder holding the finished adapter (uploaded on commit).")
    rehearsal_samples: list[dict[str, Any]] = Field(default_factory=list)
    base_model: BaseModelIdentity
    indicators: Indicators
    threshold: float | None = None
    calibration: dict[str, Any] | None = None
    definition: str | None = None
    trained_against: list[str] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    job: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the registry -----------------------------------------------------------------------------------------
class Registry:
    """Read and change the registry under one storage root.

    Reading (``load``, ``list``, ``get``, ``rehearsal_buffer``) needs no lock and no cluster.
    """

    def __init__(
        self,
        storage: Storage | str | None = None,
        lock: Literal["auto", "file", "actor"] = "auto",
        lock_timeout_s: float = 600.0,
    ):
        self.storage = storage if isinstance(storage, Storage) else Storage(storage)
        if lock == "auto":
            lock = "file" if self.storage.is_local else "actor"
        self.lock_kind = lock
        self.lock_timeout_s = lock_timeout_s
        self._lock = None

    def __repr__(self) -> str:
        return f"Registry({self.storage.uri!r})"

    # -- reading ---------------------------------------------------------------------------------------
    def load(self) -> RegistryDoc:
        try:
            text = self.storage.read_text(REGISTRY_FILE)
        except FileNotFoundError:
            return RegistryDoc()
        try:
            doc = RegistryDoc.model_validate_json(text)
        except ValueError as e:
            raise RegistryError(f"{self.storage.uri_of(REGISTRY_FILE)}: not a valid registry document ({e})") from None
        if doc.format > FORMAT:
            raise RegistryError(f"{self.storage.uri_of(REGISTRY_FILE)}: format {doc.format} is newer than this code")
        return doc

    def list(self, include_disabled: bool = True) -> list[ExpertRecord]:
        return self.load().sequence(include_disabled)

    def get(self, name: str) -> ExpertRecord:
        rec = self.load().find(_name(name))
        if rec is None:
            raise RegistryError(f"no expert named {name!r} in {self.storage.uri}")
        return rec

    def rehearsal_buffer(self, doc: RegistryDoc | None = None, exclude: set[str] = frozenset()) -> RehearsalBuffer:
        """Rehearsal samples of every task in the sequence (disabled experts included: they may come back)."""
        doc = doc or self.load()
        samples: dict[str, list[dict]] = {}
        for e in doc.sequence():
            if e.task in exclude or not e.rehearsal_uri:
                continue
            samples[e.task] = json.loads(self.storage.read_text(self.rehearsal_rel(e)))
        return RehearsalBuffer(samples)

    def check_can_add(
        self, name: str, task: str, replace: bool, doc: RegistryDoc | None = None,
        base: BaseModelIdentity | None = None,
    ) -> ExpertRecord | None:
        """Raise if ``name``/``task`` cannot be added (or, given ``base``, if the registry's experts were trained
        on another base model: one registry serves one base); return the record a replace would retire."""
        _name(name, "expert name")
        _name(task, "task name")
        doc = doc or self.load()
        if base is not None:
            others = [e for e in doc.experts if e.name != name and e.base_model.fingerprint != base.fingerprint]
            if others:
                raise BaseModelMismatch(
                    f"expert {name!r} was trained on base {base.name_or_path} (fingerprint {_fp(base.fingerprint)}), "
                    f"but the registry's experts {[e.name for e in others]} on base "
                    f"{others[0].base_model.name_or_path} (fingerprint {_fp(others[0].base_model.fingerprint)}): "
                    "one registry holds experts of one base model"
                )
        existing = doc.find(name)
        if existing is not None and not replace:
            raise ExpertExists(
                f"expert {name!r} already exists (version {existing.version}, position {existing.position}); "
                "pass --replace to train a new version"
            )
        other = next((e for e in doc.experts if e.task == task and e.name != name), None)
        if other is not None:
            raise RegistryError(
                f"task {task!r} is already served by expert {other.name!r}; replace that one "
                f"(--name {other.name} --replace) instead of adding a second expert for it"
            )
        return existing

    # -- writing ---------------------------------------------------------------------------------------
    def _get_lock(self):
        if self._lock is None:
            if self.lock_kind == "file":
                if not self.storage.is_local:
                    raise RegistryError(f"lock='file' needs a local or NFS storage root, not {self.storage.uri}")
                self._lock = FileLock(self.storage.local_path(LOCK_FILE), self.lock_timeout_s)
            else:
                self._lock = ActorLock(self.storage.uri, self.lock_timeout_s)
        return self._lock

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[RegistryDoc]:
        """Lock, load, let the caller change the document, then swap it in (if the caller did not raise)."""
        with self._get_lock().hold():
            doc = self.load()
            before = doc.generation
            yield doc
            if self.load().generation != before:  # fence: someone wrote while we thought we held the lock
                raise ConcurrentModification(
                    f"{self.storage.uri_of(REGISTRY_FILE)} changed during this write (lock lease lost?); retry"
                )
            doc.generation = before + 1
            doc.events = doc.events[-MAX_EVENTS:]
            self.storage.write_text_atomic(REGISTRY_FILE, doc.model_dump_json(indent=2))

    def _event(self, doc: RegistryDoc, op: str, rec: ExpertRecord, detail: str | None = None) -> None:
        doc.events.append(
            Event(generation=doc.generation + 1, time=now_iso(), op=op, name=rec.name, version=rec.version,
                  position=rec.position, detail=detail)
        )

    def add(
        self,
        new: NewExpert,
        replace: bool = False,
        check: Callable[[RegistryDoc], None] | None = None,
    ) -> ExpertRecord:
        """Commit a trained expert: upload its files, then append it to the sequence (atomically).

        ``check(doc)`` runs under the lock on the current document before anything is written and may raise
        to abort (the job uses it to validate against experts registered while it was training). With
        ``replace`` an existing expert of that name is retired and the new version goes to the end of the
        sequence: it was trained against every other task's rehearsal samples, so under newest-first routing
        it belongs in front of them (keeping the old position would put it behind experts that never learned
        to reject its new data).
        """
        from see_ray.core.expert import ADAPTER_WEIGHTS, check_adapter_folder

        adapter_dir = check_adapter_folder(new.adapter_dir)
        digest = sha256_file(adapter_dir / ADAPTER_WEIGHTS)
        with self._transaction() as doc:
            existing = self.check_can_add(new.name, new.task, replace, doc, new.base_model)
            if check is not None:
                check(doc)
            version = max(doc.versions_of(new.name), default=0) + 1
            # 1) files first: a kill from here on leaves only unreferenced files.
            adapter_rel = f"adapters/{new.name}/v{version}"
            adapter_uri = self.storage.upload_dir(adapter_dir, adapter_rel)
            rehearsal_rel = f"rehearsal/{new.task}/{new.name}.v{version}.json"
            self.storage.write_text_atomic(rehearsal_rel, json.dumps(new.rehearsal_samples, ensure_ascii=False))
            # 2) then the document that points at them.
            rec = ExpertRecord(
                name=new.name,
                task=new.task,
                version=version,
                position=doc.next_position,
                status="active",
                adapter_uri=adapter_uri,
                adapter_sha256=digest,
                base_model=new.base_model,
                indicators=new.indicators,
                threshold=new.threshold,
                calibration=new.calibration,
                threshold_history=[ThresholdChange(threshold=new.threshold, at=now_iso(), reason="registered",
                                                   calibration=new.calibration)],
                definition=new.definition,
                trained_against=sorted(new.trained_against),
                rehearsal_uri=self.storage.uri_of(rehearsal_rel),
                rehearsal_count=len(new.rehearsal_samples),
                training=new.training,
                validation=new.validation,
                created_at=now_iso(),
                job=new.job,
            )
            doc.next_position += 1
            if existing is not None:
                doc.experts.remove(existing)
                existing.status = "replaced"
                doc.retired.append(existing)
            doc.experts.append(rec)
            detail = f"replaces version {existing.version}" if existing is not None else None
            self._event(doc, "replace" if existing is not None else "add", rec, detail)
            fault_point("commit")  # files written, the document not yet swapped: the window a kill must survive
        return rec

    def set_threshold(self, name: str, threshold: float, reason: str,
                      calibration: dict[str, Any] | None = None) -> ExpertRecord:
        """Give an active expert a new threshold (re-calibration; its adapter is untouched) and append it to the
        expert's ``threshold_history``."""
        _name(name)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold {threshold} must lie in (0, 1)")
        with self._transaction() as doc:
            rec = doc.find(name)
            if rec is None:
                raise RegistryError(f"no expert named {name!r} in {self.storage.uri}")
            rec.threshold = threshold
            rec.calibration = calibration
            rec.threshold_history.append(
                ThresholdChange(threshold=threshold, at=now_iso(), reason=reason, calibration=calibration))
            self._event(doc, "threshold", rec, f"{threshold:.4f}: {reason}")
        return rec

    def _set_status(self, name: str, status: Literal["active", "disabled"]) -> ExpertRecord:
        _name(name)
        with self._transaction() as doc:
            rec = doc.find(name)
            if rec is None:
                raise RegistryError(f"no expert named {name!r} in {self.storage.uri}")
            rec.status = status
            self._event(doc, "enable" if status == "active" else "disable", rec)
        return rec

    def disable(self, name: str) -> ExpertRecord:
        """Keep the expert (and its position) in the sequence, but routing skips it."""
        return self._set_status(name, "disabled")

    def enable(self, name: str) -> ExpertRecord:
        return self._set_status(name, "active")

    def remove(self, name: str, purge: bool = False) -> ExpertRecord:
        """Take the expert out of the sequence. Its adapter and rehearsal files stay unless ``purge``.

        With ``purge`` every version's files and records go; files are deleted only after the document
        stopped referencing them, so a kill in between leaves orphans, never dangling references.
        """
        _name(name)
        with self._transaction() as doc:
            rec = doc.find(name)
            if rec is None and not (purge and any(e.name == name for e in doc.retired)):
                raise RegistryError(f"no expert named {name!r} in {self.storage.uri}")
            gone: list[ExpertRecord] = []
            if rec is not None:
                doc.experts.remove(rec)
                rec.status = "removed"
                doc.retired.append(rec)
            if purge:
                gone = [e for e in doc.retired if e.name == name]
                doc.retired = [e for e in doc.retired if e.name != name]
            rec = rec or gone[-1]
            self._event(doc, "purge" if purge else "remove", rec)
        for e in gone:  # after the swap
            self.storage.delete_dir(self.adapter_rel(e))
            if e.rehearsal_uri:
                self.storage.delete_file(self.rehearsal_rel(e))
        if purge:
            with contextlib.suppress(OSError):
                if not self.storage.list_dir(f"adapters/{name}"):
                    self.storage.delete_dir(f"adapters/{name}")
        return rec

    # -- helpers ---------------------------------------------------------------------------------------
    # Files are found through the fixed layout relative to THIS registry's root, not through the absolute
    # URIs recorded for humans: a registry copied or moved elsewhere, or an NFS share mounted at different
    # paths on different nodes, still resolves its own files.
    @staticmethod
    def adapter_rel(rec: ExpertRecord) -> str:
        return f"adapters/{rec.name}/v{rec.version}"

    @staticmethod
    def rehearsal_rel(rec: ExpertRecord) -> str:
        return f"rehearsal/{rec.task}/{rec.name}.v{rec.version}.json"

    def adapter_path(self, rec: ExpertRecord, cache_dir: str | Path | None = None) -> Path:
        """A local folder with the record's adapter (downloaded from an object store if needed), hash-checked."""
        from see_ray.core.expert import ADAPTER_WEIGHTS, AdapterError

        path = self.storage.local_dir(self.adapter_rel(rec), cache_dir)
        got = sha256_file(path / ADAPTER_WEIGHTS)
        if got != rec.adapter_sha256:
            raise AdapterError(f"{rec.adapter_uri}: adapter hash {got[:12]} does not match the registry's")
        return path


def format_sequence(records: list[ExpertRecord], order: str = "newest_first") -> str:
    """A small table of the sequence, in the order routing asks the experts."""
    from see_ray.core.routing import ordered

    rows = ordered(records, order)
    if not rows:
        return "(no experts)"
    lines = [f"{'#':>3} {'name':<20} {'task':<20} {'ver':>3} {'pos':>4} {'status':<9} {'thr':>5} {'accept':>6} {'reject':>6}"]
    for i, e in enumerate(rows, 1):
        v = e.validation or {}
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        thr = fmt(e.threshold)
        lines.append(
            f"{i:>3} {e.name:<20} {e.task:<20} {e.version:>3} {e.position:>4} {e.status:<9} {thr:>5} "
            f"{fmt(v.get('accept_rate')):>6} {fmt(v.get('reject_rate')):>6}"
        )
    return "\n".join(lines)
