"""Shared fixtures for the zoo tests: build a spec through the Python API and through the CLI, load
the generated module independently of specc, and read its weights and manifest."""

from __future__ import annotations

import difflib
import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specc

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"
ARTIFACTS = ("model.py", "weights.safetensors", "manifest.json")


class Zoo:
    """Builds, loads and inspects the zoo specs; every build goes into a fresh temporary directory."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp = tmp_path_factory

    @staticmethod
    def spec(name: str) -> Path:
        return SPECS / f"{name}.yaml"

    def _out(self, name: str) -> Path:
        return self._tmp.mktemp(name) / "out"

    def build_api(self, name: str, **overrides) -> Path:
        out = self._out(name)
        result = specc.build(self.spec(name), out, **overrides)
        assert Path(result) == out
        return out

    def build_cli(self, name: str, *sets: str, run: bool = False) -> Path:
        """`python -m specc.cli build SPEC -o OUT [--set k=v]... [--run]`; fails the test on a non-zero exit."""
        out = self._out(name)
        cmd = [sys.executable, "-m", "specc.cli", "build", str(self.spec(name)), "-o", str(out), "--no-color"]
        for s in sets:
            cmd += ["--set", s]
        if run:
            cmd.append("--run")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        assert f"built {name} -> " in proc.stdout
        if run:
            assert "ran " in proc.stdout, proc.stdout
        return out

    @staticmethod
    def load_dir(directory: Path):
        """Import the generated model.py (as a fresh module, no specc involved) and call its load()."""
        mod_name = f"zoo_generated_{uuid.uuid4().hex}"
        spec = importlib.util.spec_from_file_location(mod_name, Path(directory) / "model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        model = module.load(directory)
        assert not model.training, "load() must return the model in eval mode"
        return module, model

    @staticmethod
    def weights(directory: Path) -> dict[str, torch.Tensor]:
        return load_file(str(Path(directory) / "weights.safetensors"))

    @staticmethod
    def manifest(directory: Path) -> dict:
        return json.loads((Path(directory) / "manifest.json").read_text())

    @staticmethod
    def files(directory: Path) -> dict[str, bytes]:
        return {f: (Path(directory) / f).read_bytes() for f in ARTIFACTS}


def assert_same_files(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Byte-identical build artifacts; on a difference, show a unified diff of the text files."""
    assert a.keys() == b.keys()
    for name in a:
        if a[name] == b[name]:
            continue
        if name.endswith((".py", ".json")):
            diff = "\n".join(difflib.unified_diff(a[name].decode().splitlines(), b[name].decode().splitlines(),
                                                  "first", "second", lineterm="", n=1))
            pytest.fail(f"{name} differs between two builds:\n{diff}")
        pytest.fail(f"{name} differs between two builds ({len(a[name])} vs {len(b[name])} bytes)")


@pytest.fixture(scope="session")
def same_files():
    return assert_same_files


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory)


def unique_param_count(model: torch.nn.Module) -> int:
    """Number of scalars in the module's distinct parameters (a tied weight counts once)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = p.numel()
    return sum(seen.values())


@pytest.fixture(scope="session")
def count_params():
    return unique_param_count


def perturbed(state: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """The same weights plus seeded noise, so that norm gains of exactly 1 and biases of exactly 0 (their
    initial values) cannot hide a parameter that is mapped wrongly or ignored."""
    gen = torch.Generator().manual_seed(seed)  # integer buffers (batch norm's num_batches_tracked) stay as they are
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in sorted(state.items())}


@pytest.fixture(scope="session")
def perturb():
    return perturbed


@pytest.fixture
def one_thread():
    """One torch thread for the test: faster on a busy 2-core machine, and the same float sums in every
    run (training tests compare runs to each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
