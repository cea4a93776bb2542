"""Hub downloads fetch what loading needs and no more: a sharded repo's shards by the names its index
lists, never a second copy of the weights (Mistral repos also hold consolidated.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

from loratune.hub import resolve


def test_sharded_repo_downloads_its_index_then_the_listed_shards(tmp_path, monkeypatch):
    repo = tmp_path / "snapshot"
    repo.mkdir()
    calls = []

    def fake_download(repo_id, patterns, what="model"):
        calls.append(list(patterns))
        (repo / "config.json").write_text("{}")
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (repo / "model.safetensors.index.json").write_text(json.dumps(index))
        return Path(repo)

    monkeypatch.setattr(resolve, "download", fake_download)
    assert resolve.resolve_model_dir("someone/model") == repo
    assert "*.safetensors" not in calls[0] and "model.safetensors.index.json" in calls[0]
    assert calls[1][-2:] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_shard_names_of_a_broken_index_are_empty(tmp_path):
    (tmp_path / "i.json").write_text("[1, 2]")
    assert resolve.shard_names(tmp_path / "i.json") == []
    (tmp_path / "j.json").write_text('{"weight_map": {"x": 3, "y": "s.safetensors"}}')
    assert resolve.shard_names(tmp_path / "j.json") == ["s.safetensors"]
