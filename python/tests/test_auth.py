"""Image servers that want a token: the same settings as the Rust library, from Python."""

import pytest

import imgcache
from imgcache import ImageCacheManager

from conftest import Route, volume

TOKEN = "tok-py-7c1e-secret"


def test_a_bearer_token_file_and_headers_reach_the_image_server(origin, cache_dir, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    monkeypatch.setenv("IMAGE_SERVER", origin.url(""))
    monkeypatch.setenv("CACHE_BEARER_TOKEN_FILE", str(token))
    monkeypatch.setenv("CACHE_HTTP_HEADERS", "X-Api-Key: k-py")
    body = volume(1, 100_000)
    origin.route("ct/a.nii.gz", Route(body))
    m = ImageCacheManager(cache_dir=cache_dir)
    with open(m.get_file("ct/a.nii.gz"), "rb") as f:
        assert f.read() == body
    assert origin.credentials == [("ct/a.nii.gz", f"Bearer {TOKEN}", "k-py")]
    stats = m.get_stats()
    assert stats["request_headers"] == ["authorization", "x-api-key"]
    assert TOKEN not in repr(stats) and TOKEN not in repr(m)


def test_headers_without_an_image_server_are_a_config_error(cache_dir, monkeypatch):
    monkeypatch.setenv("CACHE_BEARER_TOKEN", TOKEN)
    with pytest.raises(imgcache.CacheError) as e:
        ImageCacheManager(cache_dir=cache_dir).get_stats()
    assert "IMAGE_SERVER" in str(e.value) and TOKEN not in str(e.value)
