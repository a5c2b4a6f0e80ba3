"""The install is described once: requirements.txt (what scripts/install.sh and environment.yml install) and
pyproject.toml (package metadata and extras) name the same pins, and the code carries a licence."""
import re
import tomllib

from utils import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def requirement_name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pins(lines) -> dict:
    """Package name -> the requirement as written (`transformers==5.24.0`, `tqdm`), comments and blanks dropped."""
    requirements = [line.split("#", 1)[0].strip() for line in lines]
    return {requirement_name(r): r for r in requirements if r and not r.startswith("-")}


def test_pyproject_names_the_pins_requirements_txt_installs():
    installed = pins((REPO_ROOT / "requirements.txt").read_text().splitlines())
    project = PYPROJECT["project"]
    base = pins(project["dependencies"])
    extras = {name: pins(group) for name, group in project["optional-dependencies"].items()}
    assert {"plot", "peft", "dev"} <= set(extras)
    torch_pin = re.search(r"pip install -q (torch==\S+) -r requirements.txt",
                          (REPO_ROOT / "scripts" / "install.sh").read_text())[1]
    assert base.pop("torch") == torch_pin, "install.sh installs torch before requirements.txt, pinned as pyproject"
    assert base.keys() | extras["dev"].keys() == installed.keys(), "install.sh installs the runtime and the dev extra"
    for group in (base, *extras.values()):
        for name, requirement in group.items():
            assert installed.get(name, requirement) == requirement, f"{name}: pyproject and requirements.txt differ"


def test_environment_yml_installs_requirements_txt_with_the_same_torch():
    environment = (REPO_ROOT / "environment.yml").read_text()
    assert "- -r requirements.txt" in environment and "- torch==2.13.0" in environment
    assert "conda-forge" in environment and "pytorch" not in environment.split("channels:")[1].split("dependencies")[0]


def test_every_top_level_module_and_package_is_packaged():
    modules = sorted(p.stem for p in REPO_ROOT.glob("*.py"))
    assert sorted(PYPROJECT["tool"]["setuptools"]["py-modules"]) == modules
    packages = sorted(p.parent.name for p in REPO_ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "bench"))
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == packages


def test_the_code_has_a_licence():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")
