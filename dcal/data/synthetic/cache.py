"""The generated benchmark on disk: one .npz per spec (named by `SyntheticSpec.key`, a hash of the spec and
`GENERATOR_VERSION`), written atomically, and `load_or_generate`."""
from __future__ import annotations

import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .render import generate
from .spec import SyntheticData, SyntheticSpec

_log = logging.getLogger("dcal.data")


def default_cache_dir() -> Path:
    """``$DCAL_DATA_CACHE`` if set, else ``~/.cache/dcal``."""
    env = os.environ.get("DCAL_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dcal"


def cache_path(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``spec``'s dataset is cached: ``<cache_dir>/synthetic-<family>-<key>.npz``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"synthetic-{spec.family}-{spec.key()}.npz"


_ARRAYS = ("images", "labels", "part_boxes", "object_boxes", "distractor_boxes", "is_train", "poses",
           "distractor_labels")


def save_npz(data: SyntheticData, path: str | os.PathLike) -> None:
    """Write ``data`` as a compressed .npz, atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(data, k) for k in _ARRAYS}
    arrays["class_names"] = np.array(data.class_names, dtype=str)
    arrays["spec_json"] = np.array(data.spec.to_json() if data.spec is not None else "", dtype=str)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: numpy does not append '.npz' to the temp name
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # never leave half-written temp files behind
        raise


def load_npz(path: str | os.PathLike) -> SyntheticData:
    """Read a dataset written by :func:`save_npz`; a damaged file raises :class:`DatasetError`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (*_ARRAYS, "class_names", "spec_json") if k not in z.files]
            if missing:
                raise DatasetError(f"{path}: cache file lacks arrays {missing}; delete it to regenerate")
            arrays = {k: z[k] for k in _ARRAYS}
            names = [str(s) for s in z["class_names"]]
            spec_json = str(z["spec_json"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read cache file ({type(e).__name__}: {e}); delete it to regenerate") from e
    spec = SyntheticSpec.from_json(spec_json) if spec_json else None
    return SyntheticData(class_names=names, spec=spec, **arrays)


def load_or_generate(spec: SyntheticSpec | None = None, cache_dir: str | os.PathLike | None = None,
                     logger: logging.Logger | None = None) -> SyntheticData:
    """The dataset for ``spec``: from the on-disk cache if there, else generated and cached.

    Args:
        spec: defaults to ``SyntheticSpec()`` (the 64 px, 10-class benchmark).
        cache_dir: defaults to ``$DCAL_DATA_CACHE`` or ``~/.cache/dcal``.
        logger: where to report generation/caching (default ``dcal.data``).
    """
    spec = spec if spec is not None else SyntheticSpec()
    log = logger or _log
    path = cache_path(spec, cache_dir)
    if path.exists():
        data = load_npz(path)
        if data.spec != spec:
            raise DatasetError(f"{path}: cache file holds spec {data.spec}, expected {spec}; delete it to regenerate")
        log.debug("loaded synthetic %s data from %s", spec.family, path)
        return data
    t0 = time.perf_counter()
    data = generate(spec)
    log.info("generated %d synthetic %s images in %.1f s -> %s", len(data), spec.family, time.perf_counter() - t0, path)
    save_npz(data, path)
    return data
