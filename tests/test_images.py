"""The content-addressed image store."""

from __future__ import annotations

import hashlib

import pytest

from db.images import ImageStore


def test_put_is_content_addressed_and_idempotent(tmp_path) -> None:
    store = ImageStore(tmp_path)
    data = b"\x89PNG fake bytes"
    first = store.put(data)
    second = store.put(data)
    assert first == second
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.path == f"{first.sha256[:2]}/{first.sha256[2:4]}/{first.sha256}.png"
    assert store.read(first.path) == data
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{first.sha256}.png"]


def test_paths_outside_the_store_are_refused(tmp_path) -> None:
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ValueError, match="outside"):
        store.resolve("../../etc/passwd")
