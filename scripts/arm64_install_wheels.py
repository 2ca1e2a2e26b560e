"""Install wheels into the emulated aarch64 root's venv from the x86-64 host, at native speed.

    python3 scripts/arm64_install_wheels.py --site ROOT/opt/venv/lib/python3.11/site-packages \
        --bin ROOT/opt/venv/bin --interpreter /opt/venv/bin/python --strip ROOT  a.whl b.whl ...

Why: pip inside the root runs under qemu (~10-15x slower); resolving, unpacking and byte-compiling
transformers, peft, torch and their dependencies there was stopped after 70 minutes. A wheel
install is only unpacking (PEP 427), which does not care which CPU runs it. scripts/arm64-check.sh
--full resolves and downloads the aarch64 wheels with the host's pip (`pip download
--platform ...`) and hands the files to this script.

Per wheel: skipped when the same version is installed; another installed version is removed
first through its RECORD (as pip uninstall does); the files go to site-packages (`.data/purelib`,
`.data/platlib` too), `.data/scripts` and console_scripts entry points to --bin with the root's
interpreter in the shebang; RECORD lists the installed paths; INSTALLER names this script. When
the host's Python has the root's major.minor version, the new modules are byte-compiled here
(the .pyc names the path inside the root: --strip), so the first import under qemu need not.
Standard library only. Prints one line per wheel and a total.
"""
from __future__ import annotations

import argparse
import configparser
import csv
import io
import os
import py_compile
import re
import shutil
import sys
import time
import zipfile

INSTALLER = "pyedge-arm64-check"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_name_version(path: str) -> tuple[str, str]:
    """{distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl"""
    parts = os.path.basename(path)[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{path}: not a wheel file name")
    return parts[0], parts[1]


def installed_versions(site: str) -> dict[str, tuple[str, str]]:
    """canonical name -> (version, dist-info dir) of what site-packages holds."""
    out = {}
    for d in os.listdir(site):
        if d.endswith(".dist-info"):
            name, _, version = d[:-len(".dist-info")].rpartition("-")
            out[canonical(name)] = (version, os.path.join(site, d))
    return out


def uninstall(site: str, dist_info: str) -> int:
    """Removes the files a dist-info's RECORD lists (paths relative to site-packages), then
    directories left empty and the dist-info itself. Returns the number of files removed."""
    removed, dirs = 0, set()
    record = os.path.join(dist_info, "RECORD")
    if os.path.exists(record):
        with open(record, newline="") as f:
            for row in csv.reader(f):
                if not row:
                    continue
                p = os.path.normpath(os.path.join(site, row[0]))
                if os.path.isfile(p) or os.path.islink(p):
                    os.remove(p)
                    removed += 1
                    dirs.add(os.path.dirname(p))
                    pyc_dir = os.path.join(os.path.dirname(p), "__pycache__")
                    if p.endswith(".py") and os.path.isdir(pyc_dir):
                        stem = os.path.basename(p)[:-3] + "."
                        for c in os.listdir(pyc_dir):
                            if c.startswith(stem) and c.endswith(".pyc"):
                                os.remove(os.path.join(pyc_dir, c))
                        dirs.add(pyc_dir)
    shutil.rmtree(dist_info, ignore_errors=True)
    for d in sorted(dirs, key=len, reverse=True):  # deepest first
        while d.startswith(site) and d != site and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
            d = os.path.dirname(d)
    return removed


def entry_point_script(interpreter: str, spec: str) -> str:
    module, _, attr = spec.partition(":")
    attr = attr.split("[")[0].strip()
    head = attr.split(".")[0]
    return (f"#!{interpreter}\nimport sys\nfrom {module.strip()} import {head}\n"
            f"if __name__ == '__main__':\n    sys.exit({attr}())\n")


def install(whl: str, site: str, bin_dir: str, interpreter: str, strip: str | None,
            compile_pyc: bool) -> tuple[str, int]:
    """Unpacks one wheel. Returns (what was done, number of files written)."""
    name, version = wheel_name_version(whl)
    have = installed_versions(site).get(canonical(name))
    if have and have[0] == version:
        return "already installed", 0
    note = ""
    if have:
        n = uninstall(site, have[1])
        note = f" (replaced {have[0]}, {n} files removed)"
    data_prefix = f"{name}-{version}.data/"
    prefix_dir = os.path.dirname(os.path.dirname(bin_dir.rstrip("/")))  # the venv
    written: list[str] = []
    dist_info = None
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            member = info.filename
            if member.startswith(data_prefix):
                kind, _, rest = member[len(data_prefix):].partition("/")
                base = {"purelib": site, "platlib": site, "scripts": bin_dir,
                        "data": prefix_dir,
                        "headers": os.path.join(prefix_dir, "include", "site", name)}.get(kind)
                if base is None:
                    continue
                dest = os.path.join(base, rest)
            else:
                dest = os.path.join(site, member)
                top = member.split("/")[0]
                if top.endswith(".dist-info"):
                    dist_info = os.path.join(site, top)
            dest = os.path.normpath(dest)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            data = z.read(info)
            if member.startswith(data_prefix + "scripts/") and data.startswith(b"#!python"):
                first, _, rest = data.partition(b"\n")  # "#!python" (PEP 427): the interpreter
                data = b"#!" + interpreter.encode() + b"\n" + rest
            with open(dest, "wb") as f:
                f.write(data)
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111 or member.startswith(data_prefix + "scripts/"):
                os.chmod(dest, 0o755)
            written.append(dest)
        if dist_info is None:
            raise ValueError(f"{whl}: no .dist-info directory")
        ep = os.path.join(dist_info, "entry_points.txt")
        if os.path.exists(ep):
            cp = configparser.ConfigParser(delimiters=("=",), interpolation=None)
            cp.optionxform = str
            cp.read(ep)
            for section in ("console_scripts", "gui_scripts"):
                if cp.has_section(section):
                    for script, spec in cp.items(section):
                        dest = os.path.join(bin_dir, script)
                        os.makedirs(bin_dir, exist_ok=True)
                        with open(dest, "w") as f:
                            f.write(entry_point_script(interpreter, spec))
                        os.chmod(dest, 0o755)
                        written.append(dest)
    if compile_pyc:
        for p in list(written):
            if p.endswith(".py") and p.startswith(site):
                dfile = p[len(strip):] if strip and p.startswith(strip) else p
                try:
                    written.append(py_compile.compile(p, dfile=dfile, doraise=True, quiet=2))
                except (py_compile.PyCompileError, SyntaxError, ValueError):
                    pass  # left to the root's interpreter (e.g. a file for another version)
    with open(os.path.join(dist_info, "INSTALLER"), "w") as f:
        f.write(INSTALLER + "\n")
    record = os.path.join(dist_info, "RECORD")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for p in written + [os.path.join(dist_info, "INSTALLER")]:
        if p != record:
            w.writerow([os.path.relpath(p, site), "", ""])
    w.writerow([os.path.relpath(record, site), "", ""])
    with open(record, "w") as f:
        f.write(buf.getvalue())
    return "installed" + note, len(written)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", required=True, help="the root's site-packages, as a host path")
    ap.add_argument("--bin", required=True, help="the root venv's bin/, as a host path")
    ap.add_argument("--interpreter", required=True, help="the venv's python inside the root")
    ap.add_argument("--strip", help="host path of the root (removed from paths in .pyc files)")
    ap.add_argument("--python-version", help="the root's major.minor; .pyc written when the "
                    "host's matches")
    ap.add_argument("wheels", nargs="+")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.site):
        ap.error(f"--site {a.site} is not a directory")
    host = "%d.%d" % sys.version_info[:2]
    compile_pyc = a.python_version == host
    t0 = time.time()
    done = 0
    for whl in a.wheels:
        what, n = install(whl, a.site, a.bin, a.interpreter, a.strip, compile_pyc)
        done += what.startswith("installed")
        print(f"{os.path.basename(whl)}: {what}" + (f", {n} files" if n else ""))
    print(f"{done} of {len(a.wheels)} wheels installed in {time.time() - t0:.1f}s"
          f"{' (with .pyc)' if compile_pyc else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
