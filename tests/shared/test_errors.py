"""The user errors: each is a UserError (one line, exit 2 at the CLI) and still the builtin it replaced."""

import pytest

from shared import storage
from shared.errors import BadInput, MissingInput, UnknownName, UserError
from shared.registry import load_registry


def test_an_unknown_model_is_a_user_error_and_still_a_key_error():
    with pytest.raises(UnknownName) as info:
        load_registry().get("no-such-model")
    assert isinstance(info.value, KeyError) and isinstance(info.value, UserError)
    assert str(info.value).startswith("unknown model 'no-such-model'; the registry knows: ")  # no KeyError quotes


def test_reading_a_missing_or_foreign_table_is_a_user_error(tmp_path):
    with pytest.raises(MissingInput, match="not found"):
        storage.read_parquet(str(tmp_path / "nope.parquet"))
    text = tmp_path / "notes.parquet"
    text.write_text("not a table")
    with pytest.raises(BadInput, match="Parquet magic bytes not found"):
        storage.read_parquet(str(text))


def test_the_library_errors_are_user_errors():
    from cluster.jobs import SubmitError
    from cluster.local_state import ClusterError
    from shared.artifact import ArtifactError
    from shared.config import ConfigError
    from shared.models import ModelLoadError
    from shared.ray_boot import RayConnectError

    for cls, builtin in [(ConfigError, ValueError), (ArtifactError, RuntimeError), (ModelLoadError, RuntimeError),
                         (RayConnectError, ConnectionError), (ClusterError, ValueError), (SubmitError, ValueError)]:
        assert issubclass(cls, UserError) and issubclass(cls, builtin), cls
