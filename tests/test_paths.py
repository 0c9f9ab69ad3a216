"""One cache folder for stores, vocabulary maps and assets, named by either environment variable."""

from __future__ import annotations

from pathlib import Path

from cdm.assets import default_cache
from cdm.mapping.build import default_cache_dir as map_cache
from cdm.paths import cache_dir
from cdm.precompute.run import default_cache_dir as store_cache


def test_either_variable_names_the_one_cache(monkeypatch, tmp_path):
    for v in ("CDM_CACHE", "CDM_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cdm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Path(store_cache()) == Path(map_cache()) == default_cache() == tmp_path / "xdg" / "cdm"
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "a"))  # the assets' old name now moves everything
    assert Path(store_cache()) == Path(map_cache()) == default_cache() == tmp_path / "a"
    monkeypatch.setenv("CDM_CACHE_DIR", str(tmp_path / "b"))  # both set: stores/maps follow CDM_CACHE_DIR
    assert Path(store_cache()) == Path(map_cache()) == tmp_path / "b" and default_cache() == tmp_path / "a"
    monkeypatch.delenv("CDM_CACHE")
    assert default_cache() == tmp_path / "b"


def test_a_url_cache_stays_a_url_and_local_assets_fall_back(monkeypatch, tmp_path):
    """CDM_CACHE_DIR=s3://bucket/cdm shares stores and vocabulary maps through the bucket (a Path would collapse
    '//' into a local folder 's3:/bucket'); extracted assets need local disk and use the local default instead."""
    for v in ("CDM_CACHE", "CDM_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CDM_CACHE_DIR", "s3://bucket/cdm")
    assert store_cache() == map_cache() == "s3://bucket/cdm"
    assert cache_dir() == default_cache() == tmp_path / "home" / ".cache" / "cdm"
    monkeypatch.setenv("CDM_CACHE_DIR", "~/shared-cache")
    assert store_cache() == map_cache() == str(tmp_path / "home" / "shared-cache")
