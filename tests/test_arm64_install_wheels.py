"""scripts/arm64_install_wheels.py: the host-side wheel installer that fills the emulated aarch64
root's venv for `arm64-check.sh --full` (unpacking, console scripts with the root's interpreter,
RECORD, replacing another version, skipping the same one, .pyc naming the path inside the root)."""
import importlib.util
import marshal
import os
import sys
import zipfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "arm64_install_wheels", os.path.join(HERE, "..", "scripts", "arm64_install_wheels.py"))
aiw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aiw)


def make_wheel(d, version, modules):
    """A pure wheel of 'demo_pkg' with `modules` (name -> source), a console script, a
    .data/scripts file and a .data/purelib module."""
    path = os.path.join(d, f"demo_pkg-{version}-py3-none-any.whl")
    di = f"demo_pkg-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for name, src in modules.items():
            z.writestr(f"demo_pkg/{name}.py", src)
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: demo-pkg\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/entry_points.txt", "[console_scripts]\ndemo-cli = demo_pkg.__init__:main\n")
        z.writestr(f"demo_pkg-{version}.data/scripts/demo-tool", "#!python\nprint('tool')\n")
        z.writestr(f"demo_pkg-{version}.data/purelib/demo_extra.py", "X = 1\n")
        z.writestr(f"{di}/RECORD", "")
    return path


@pytest.fixture
def venv(tmp_path):
    root = tmp_path / "root"
    site = root / "opt/venv/lib/python3.11/site-packages"
    bin_dir = root / "opt/venv/bin"
    site.mkdir(parents=True)
    bin_dir.mkdir(parents=True)
    return root, str(site), str(bin_dir)


def run(venv, wheels, pyver="0.0"):
    root, site, bin_dir = venv
    return aiw.main(["--site", site, "--bin", bin_dir, "--interpreter", "/opt/venv/bin/python",
                     "--strip", str(root), "--python-version", pyver, *wheels])


def test_install_replace_and_skip(venv, tmp_path, capsys):
    root, site, bin_dir = venv
    w1 = make_wheel(str(tmp_path), "1.0", {"__init__": "def main():\n    return 0\n",
                                           "old": "A = 1\n"})
    assert run(venv, [w1]) == 0
    assert "1 of 1 wheels installed" in capsys.readouterr().out
    assert open(os.path.join(site, "demo_pkg/old.py")).read() == "A = 1\n"
    assert os.path.exists(os.path.join(site, "demo_extra.py"))  # .data/purelib
    tool = open(os.path.join(bin_dir, "demo-tool")).read()
    assert tool.startswith("#!/opt/venv/bin/python\n") and "print('tool')" in tool
    cli = open(os.path.join(bin_dir, "demo-cli")).read()
    assert cli.startswith("#!/opt/venv/bin/python\n") and "from demo_pkg.__init__ import main" in cli
    assert os.access(os.path.join(bin_dir, "demo-cli"), os.X_OK)
    di = os.path.join(site, "demo_pkg-1.0.dist-info")
    assert open(os.path.join(di, "INSTALLER")).read().strip() == aiw.INSTALLER
    record = open(os.path.join(di, "RECORD")).read().splitlines()
    assert "demo_pkg/old.py,," in record and "../../../bin/demo-cli,," in record

    # the same version again: nothing written
    assert run(venv, [w1]) == 0
    assert "demo_pkg-1.0-py3-none-any.whl: already installed" in capsys.readouterr().out

    # another version replaces the first through its RECORD (old.py is gone)
    w2 = make_wheel(str(tmp_path), "2.0", {"__init__": "def main():\n    return 2\n",
                                           "new": "B = 2\n"})
    assert run(venv, [w2]) == 0
    assert "replaced 1.0" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(site, "demo_pkg/old.py"))
    assert os.path.exists(os.path.join(site, "demo_pkg/new.py"))
    assert [d for d in os.listdir(site) if d.endswith(".dist-info")] == ["demo_pkg-2.0.dist-info"]
    assert aiw.installed_versions(site)["demo_pkg"][0] == "2.0"


def test_pyc_names_the_path_inside_the_root(venv, tmp_path):
    root, site, _ = venv
    w = make_wheel(str(tmp_path), "1.0", {"__init__": "def main():\n    return 0\n"})
    assert run(venv, [w], pyver="%d.%d" % sys.version_info[:2]) == 0
    src = os.path.join(site, "demo_pkg/__init__.py")
    pyc = importlib.util.cache_from_source(src)
    with open(pyc, "rb") as f:
        code = marshal.loads(f.read()[16:])
    assert code.co_filename == "/opt/venv/lib/python3.11/site-packages/demo_pkg/__init__.py"
    record = open(os.path.join(site, "demo_pkg-1.0.dist-info/RECORD")).read()
    assert os.path.relpath(pyc, site) in record


def test_other_python_version_writes_no_pyc(venv, tmp_path):
    _, site, _ = venv
    assert run(venv, [make_wheel(str(tmp_path), "1.0", {"__init__": "X = 0\n"})]) == 0
    assert not os.path.exists(os.path.join(site, "demo_pkg/__pycache__"))


def test_bad_wheel_name(venv, tmp_path):
    with pytest.raises(ValueError, match="not a wheel file name"):
        aiw.wheel_name_version(str(tmp_path / "x.whl"))
