"""The built-in offline corpus: text that is on this kind of machine or inside installed
packages, never fetched from a hub. Each source carries its licence into the manifest."""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path

from ..errors import DataError
from .sources import SourceSpec


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def offline_sources() -> list[SourceSpec]:
    """Every known offline text source present here (at least one, or a DataError)."""
    found: list[SourceSpec] = []
    for book in sorted(glob.glob(str(Path.home() / ".rustup/toolchains/*/share/doc/rust/html/book")))[:1]:
        # chapters and appendices only: print.html repeats the whole book, 2018-edition/ an old one
        found.append(SourceSpec(book, "MIT OR Apache-2.0", description="The Rust Programming Language (rustup docs)",
                                pattern="[ca][hp]*.html"))
    gensim = _package_dir("gensim")
    if gensim is not None and (gensim / "test/test_data/lee_background.cor").is_file():
        found.append(SourceSpec(str(gensim / "test/test_data/lee_background.cor"), "LGPL-2.1 (gensim test data)",
                                description="Lee background corpus: 300 news documents"))
    policy = Path("/usr/share/doc/python3/python-policy.html")
    if policy.is_file():
        found.append(SourceSpec(str(policy), "Debian Python Policy (DFSG-free, see /usr/share/doc/python3/copyright)",
                                description="Debian Python Policy"))
    if not found:
        raise DataError("no offline text source found on this machine; pass files or directories instead")
    return found
