"""What the README and pyproject.toml promise about installing and CI.

The test install holds no GPU package; the Pythons named are the ones CI
runs; the Keras pre-release CI pins is the one the README names.
"""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()

# Packages that pull CUDA (or are CUDA) on a fresh Linux machine.
_GPU = re.compile(r"^(torch|tensorflow(?!-cpu)|triton|nvidia-|cuda-|jax\[cuda)")


def _name(requirement):
    return re.split(r"[ <>=!~;]", requirement, maxsplit=1)[0].lower()


def test_the_test_install_holds_no_gpu_package():
    extras = PROJECT["optional-dependencies"]
    wanted = PROJECT["dependencies"] + extras["test"] + extras["demo"]
    assert [r for r in wanted if _GPU.match(_name(r))] == []


def test_the_readme_opens_with_the_two_commands():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == [
        'pip install ".[demo]" && keras-flax demo',
        'pip install -e ".[test]" && pytest',
    ]
    assert 'pip install -e ".[test]" && pytest\n' in CI


def test_the_pythons_named_are_the_pythons_ci_runs():
    classifiers = PROJECT["classifiers"]
    versions = sorted(
        c.rsplit(" ", 1)[1]
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert versions == ["3.11", "3.12"]
    assert PROJECT["requires-python"] == ">=3.11"
    assert "Supported: Python 3.11 and 3.12" in README
    assert 'fresh_venv py312 "$python312"' in CI


def test_the_keras_pre_release_ci_pins_is_the_one_the_readme_names():
    pinned = re.findall(r"keras-nightly==[\w.]+", CI)
    assert len(set(pinned)) == 1
    assert f"`{pinned[0]}`" in README
