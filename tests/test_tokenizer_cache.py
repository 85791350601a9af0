"""A store model's tokenizer is built from its container once, then read from the file beside it; the file is used
only for the very container bytes and tokenizer code it was built from."""

from __future__ import annotations

import pytest

from lmcli import api
from lmcli.store import TOKENIZER_CACHE, copy_model
from lmcli.tokenizer import Tokenizer
from quant.container import Container

PROMPT = "<|im_start|>user\nWhat is the capital of France? 1234 café 🙂<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def store_model(smol_container, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCLI_HOME", str(tmp_path / "home"))
    return copy_model(str(smol_container), "smol")


def built_ids(container: Container) -> list[int]:
    return Tokenizer.from_metadata(container.metadata["tokenizer"]).encode(PROMPT)


def refuse_to_build(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("built from the metadata instead of read from the cache")

    monkeypatch.setattr(Tokenizer, "from_metadata", staticmethod(fail))


def test_the_second_load_reads_the_cache_and_gives_the_same_ids(store_model, monkeypatch):
    c = Container(store_model)
    expected = built_ids(c)
    assert api._tokenizer(c).encode(PROMPT) == expected
    assert (store_model.parent / TOKENIZER_CACHE).is_file()
    refuse_to_build(monkeypatch)
    assert api._tokenizer(Container(store_model)).encode(PROMPT) == expected


def test_a_cache_from_other_container_bytes_or_other_code_is_rebuilt(store_model, monkeypatch):
    c = Container(store_model)
    api._tokenizer(c)
    path = store_model.parent / TOKENIZER_CACHE
    key, _, rest = path.read_text(encoding="utf-8").partition("\n")
    digest, build = key.split(" ")
    expected = built_ids(c)
    calls = []
    real = Tokenizer.from_metadata
    monkeypatch.setattr(Tokenizer, "from_metadata", staticmethod(lambda md: calls.append(1) or real(md)))
    for stale in (f"{'0' * len(digest)} {build}", f"{digest} another-build"):  # a replaced container; new code
        path.write_text(f"{stale}\n{rest}", encoding="utf-8")
        assert api._tokenizer(c).encode(PROMPT) == expected
        assert path.read_text(encoding="utf-8").partition("\n")[0] == key  # rewritten for these bytes and code
    assert len(calls) == 2


def test_a_damaged_cache_is_rebuilt(store_model):
    c = Container(store_model)
    api._tokenizer(c)
    path = store_model.parent / TOKENIZER_CACHE
    key = path.read_text(encoding="utf-8").partition("\n")[0]
    path.write_text(f"{key}\n{{\"format\": 1, \"backend\": \"trunc", encoding="utf-8")
    assert api._tokenizer(c).encode(PROMPT) == built_ids(c)
    assert Tokenizer.from_cache(path.read_text(encoding="utf-8").partition("\n")[2]).encode(PROMPT) == built_ids(c)


def test_nothing_is_written_beside_a_container_outside_the_store(smol_container, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCLI_HOME", str(tmp_path / "home"))
    before = set(smol_container.parent.iterdir())
    assert api._tokenizer(Container(smol_container)).encode(PROMPT) == built_ids(Container(smol_container))
    assert set(smol_container.parent.iterdir()) == before


def test_removing_the_model_removes_its_cache(store_model):
    from lmcli.store import remove_model

    api._tokenizer(Container(store_model))
    remove_model("smol")
    assert not store_model.parent.exists()
