"""The manifest names a prepared dataset: `murmur create-run --data URL_OR_PATH` (or [data] location in the run TOML)
reads its index.json, signs its location and dataset id, takes the tokenizer and vocabulary from it, and refuses a
vocabulary mismatch or a location it cannot read in one line; a manifest without one is as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from peer.cli.main import main
from peer.config import DataConfig, RunConfig
from peer.core.prepare import PrepareOptions, prepare
from peer.core.shards import PreparedDataset
from peer.lab.dataserver import served
from protocol import manifest as M

DOCS = [f"document {i}: " + "the quick brown fox " * (1 + i % 3) for i in range(200)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    (folder / "in.txt").write_text("\n\n".join(DOCS))
    prepare(PrepareOptions(inputs=(str(folder / "in.txt"),), out=folder / "ds", tokenizer="bytes", shard_tokens=3000,
                           heldout_fraction=0.1, progress=False))  # fmt: skip
    return folder / "ds"


def create_run(tmp_path: Path, *args: str, toml: str = 'swarm = "data-run"\npreset = "micro"\n'):
    (tmp_path / "run.toml").write_text(toml)
    key, out = str(tmp_path / "owner.key"), str(tmp_path / "m.json")
    return CliRunner().invoke(main, ["create-run", "--config", str(tmp_path / "run.toml"), "--key", key, "--out", out,
                                     *args])  # fmt: skip


def signed_config(tmp_path: Path) -> RunConfig:
    return RunConfig.from_manifest(M.load_json(tmp_path / "m.json").manifest)


@pytest.mark.timeout(30)
def test_the_data_location_and_id_round_trip_through_the_manifest() -> None:
    data = DataConfig(location="https://example.org/ds/", dataset_id="ab" * 32, tokenizer="cd" * 32)
    config = RunConfig(swarm="x", data=data)
    assert RunConfig.from_manifest(config.to_manifest()) == config
    assert config.data.prepared and not RunConfig(swarm="x").data.prepared
    with pytest.raises(ValueError, match="go together"):
        DataConfig(location="https://example.org/ds/")
    with pytest.raises(ValueError, match="SHA-256"):
        DataConfig(location="https://example.org/ds/", dataset_id="nope")


@pytest.mark.timeout(60)
def test_create_run_with_a_url_signs_the_location_id_tokenizer_and_vocabulary(dataset: Path, tmp_path: Path) -> None:
    with served(dataset) as server:
        result = create_run(tmp_path, "--data", server.url,
                            toml='swarm = "data-run"\npreset = "micro"\n[model]\nvocab_size = 256\n')  # fmt: skip
    assert result.exit_code == 0, result.output
    data = signed_config(tmp_path).data
    assert (data.location, data.dataset_id) == (server.url, PreparedDataset.open(dataset).dataset_id)
    assert data.tokenizer == "bytes" and f"data    {data.dataset_id}" in result.output


@pytest.mark.timeout(60)
def test_the_toml_names_a_local_folder_and_the_model_follows_its_vocabulary(dataset: Path, tmp_path: Path) -> None:
    result = create_run(tmp_path, toml=f'swarm = "data-run"\npreset = "micro"\n[data]\nlocation = "{dataset}"\n'
                                       '[model]\nd_model = 32\n')  # fmt: skip
    assert result.exit_code == 0, result.output
    config = signed_config(tmp_path)
    assert config.data.location == str(dataset.resolve()) and config.model.vocab_size == 256
    assert config.model.d_model == 32


@pytest.mark.timeout(60)
def test_create_run_refuses_a_vocabulary_that_is_not_the_datasets(dataset: Path, tmp_path: Path) -> None:
    result = create_run(tmp_path, "--data", str(dataset),
                        toml='swarm = "data-run"\npreset = "micro"\n[model]\nvocab_size = 300\n')  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0, result.output
    assert "vocabulary of 256 tokens" in result.output and "vocab_size is 300" in result.output
    assert not (tmp_path / "m.json").exists()


@pytest.mark.timeout(60)
def test_create_run_refuses_a_url_it_cannot_read_in_one_line(dataset: Path, tmp_path: Path) -> None:
    with served(dataset) as server:
        missing = create_run(tmp_path, "--data", server.url + "nothing-here/")
        gone = server.url
    assert missing.exit_code == 1 and "HTTP 404" in missing.output and missing.output.strip().count("\n") == 0
    down = create_run(tmp_path, "--data", gone)
    assert down.exit_code == 1 and "cannot read" in down.output and down.output.strip().count("\n") == 0, down.output
    nowhere = create_run(tmp_path, "--data", str(tmp_path / "no-such-folder"))
    assert nowhere.exit_code == 1 and "no prepared dataset" in nowhere.output
