"""docs/api.md is generated from the handlers; it must match them."""

from pathlib import Path

from agent import api, errors
from agent.api import apidoc

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_api_md_is_generated_from_the_code():
    assert DOC.read_text() == apidoc.render(), \
        "docs/api.md is stale: run `python -m agent.api.apidoc > docs/api.md`"


def test_every_verb_documents_result_and_errors():
    for verb in api.load_all().values():
        assert verb.doc, f"{verb.name} has no docstring"
        assert "Result" in verb.doc or "Errors" in verb.doc, f"{verb.name}: say what it returns"


def test_every_error_has_a_name_and_a_meaning():
    for cls in errors.BY_NAME.values():
        if cls is not errors.AgentError:
            assert cls.__doc__, f"{cls.name} has no docstring"
            assert cls().to_json()["data"]["name"] == cls.name
