"""Dependencies are declared and locked: every third-party import is a declared dependency of the right group,
``requirements.lock`` pins every declared package (exact version, with hashes), and the Makefile reinstalls
when the lock changes."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("wire", "core", "broker", "edge", "node", "fakes", "claw")
LOCK = ROOT / "requirements.lock"


def _declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    return {g: [Requirement(r) for r in reqs] for g, reqs in groups.items()}


def _allowed(top: str) -> set[str]:
    """The distributions code under ``top`` may import: product code the runtime dependencies only, the bench
    those and its extra, the tests everything."""
    groups = _declared()
    names = ["", "bench"] if top == "bench" else list(groups) if top == "tests" else [""]
    return {canonicalize_name(r.name) for g in names for r in groups[g]}


def _local_modules() -> set[str]:
    """Top-level names the repository itself provides (its packages, and modules such as tests/wire's helpers
    that pytest puts on sys.path)."""
    out = set(PRODUCT) | {"bench", "tests"}
    for top in (*PRODUCT, "bench", "tests"):
        out |= {p.stem for p in (ROOT / top).rglob("*.py")}
    return out


def _imports(path: Path) -> set[str]:
    """Top-level module names ``path`` imports (absolute imports only)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _third_party(top: str) -> dict[str, set[str]]:
    """Import name -> files under ``top`` importing it, for every module neither stdlib nor local."""
    local = _local_modules()
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        for name in _imports(path):
            if name not in sys.stdlib_module_names and name not in local:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("top", [*PRODUCT, "bench", "tests"])
def test_every_third_party_import_is_declared(top: str) -> None:
    dists = importlib.metadata.packages_distributions()
    allowed = _allowed(top)
    bad = []
    for name, files in sorted(_third_party(top).items()):
        provided = {canonicalize_name(d) for d in dists.get(name, [])}
        if not provided & allowed:
            what = f"distribution {', '.join(sorted(provided))}" if provided else "no installed distribution"
            bad.append(f"{name} ({what}) imported by {', '.join(sorted(files))}")
    assert not bad, (f"imports under {top}/ not declared in pyproject.toml "
                     f"({'[project] dependencies' if top in PRODUCT else 'dependencies or extras'}):\n  "
                     + "\n  ".join(bad))


def test_the_import_scan_sees_what_it_must() -> None:
    """The scan itself works: known imports of each kind are found and classified."""
    assert {"amqtt", "xmltodict", "lmdb"} <= set(_third_party("edge")) | set(_third_party("broker"))
    assert "psutil" in _third_party("bench") and "hdrh" in _third_party("bench")
    assert "wire_samples" not in _third_party("tests") and "asyncio" not in _third_party("tests")
    assert "psutil" not in {importlib.metadata.packages_distributions().get(n, [""])[0] for n in _allowed("edge")}


def _locked() -> dict[str, tuple[str, list[str], str]]:
    """Lock file: canonical name -> (version, hashes, marker)."""
    text = LOCK.read_text(encoding="utf-8")
    out = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", re.sub(r"^#.*$", "", text, flags=re.M).strip()):
        entry = re.sub(r"\s*#.*", "", entry)  # "# via ..." annotations
        spec, *hashes = [part.strip() for part in entry.replace("\\\n", " ").split("--hash=")]
        req = Requirement(spec)
        (pin,) = req.specifier
        assert pin.operator == "==", f"{req.name} is not pinned exactly in {LOCK.name}"
        out[canonicalize_name(req.name)] = (pin.version, hashes, str(req.marker or ""))
    return out


def test_lock_pins_every_declared_dependency_with_hashes() -> None:
    locked = _locked()
    assert len(locked) > 20
    for name, (version, hashes, _) in locked.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    stale = []
    for group, reqs in _declared().items():
        for r in reqs:
            pin = locked.get(canonicalize_name(r.name))
            if pin is None or not r.specifier.contains(pin[0], prereleases=True):
                stale.append(f"{r} [{group or 'runtime'}]: lock has {pin[0] if pin else 'nothing'}")
    assert not stale, "requirements.lock is stale, run scripts/lock.sh:\n  " + "\n  ".join(stale)
    assert "setuptools" in locked, "the build backend is locked too (pip install --no-build-isolation -e .)"
    assert locked["uvloop"][2] == 'sys_platform != "win32"'


def test_amqtt_is_pinned_exactly() -> None:
    """broker/ overrides private methods of amqtt's broker: the version is exact in pyproject.toml, equal to the
    locked and the installed one."""
    (amqtt,) = [r for r in _declared()[""] if r.name == "amqtt"]
    (spec,) = amqtt.specifier
    assert spec.operator == "==" and spec.version == _locked()["amqtt"][0] == importlib.metadata.version("amqtt")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_installs_from_the_lock_and_reinstalls_when_it_changes(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)

    def plan() -> str:
        r = subprocess.run(["make", "-n", "install"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    first = plan()
    assert "pip install -q --require-hashes -r requirements.lock" in first
    assert re.search(r"pip install -q --no-deps --no-build-isolation -e \.", first)
    assert not re.search(r"pip install (?!.*(--require-hashes|--no-deps)).*", first), first
    stamp = re.findall(r"touch (\.venv/\.installed-\w+)", first)
    (tmp_path / stamp[0]).parent.mkdir()
    (tmp_path / stamp[0]).touch()
    assert "pip install" not in plan(), "installed and unchanged: nothing to do"
    with open(tmp_path / "requirements.lock", "a", encoding="utf-8") as fh:
        fh.write("# changed\n")
    again = plan()
    assert "--require-hashes" in again and re.findall(r"touch (\.venv/\.installed-\w+)", again) != stamp
