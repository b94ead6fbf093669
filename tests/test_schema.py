"""`specc schema`: the JSON Schema of spec files (for editors) describes every key, and every spec
of the zoo validates against it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from specc.cli import main
from specc.dsl.schema import SpecFile, json_schema

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_zoo_spec_validates(validator, path):
    errors = sorted(validator.iter_errors(yaml.safe_load(path.read_text())), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_every_key_is_described():
    schema = json_schema()
    props = schema["properties"]
    assert set(props) == set(SpecFile.model_fields)
    for key in ("freeze", "scales", "imports", "params", "graph", "blocks", "outputs"):
        assert props[key].get("description"), key
    missing = [k for k, v in props.items() if not v.get("description")]
    assert not missing, missing
    assert schema["title"] == "specc spec file" and schema["$schema"].endswith("2020-12/schema")


def test_the_schema_refuses_what_the_compiler_refuses(validator):
    good = yaml.safe_load(SPECS[0].read_text())
    assert not list(validator.iter_errors(good))
    for bad in ({**good, "graphs": "x"}, {**good, "specc": 2}, {**good, "freeze": "h.*"},
                {**good, "scales": {"n": {"d": [1]}}}, {**good, "imports": "my_ops"}):
        assert list(validator.iter_errors(bad)), bad
    ok = {**good, "freeze": ["h.*"], "scales": {"n": {"layers": 1}}, "imports": ["my_ops", "lab.ops"]}
    assert not list(validator.iter_errors(ok))


def test_cli_prints_and_writes_the_schema(tmp_path, capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json_schema()
    out = tmp_path / "spec.schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == printed
    assert main(["schema", "-o", str(tmp_path / "missing" / "dir" / "x.json")]) == 2
