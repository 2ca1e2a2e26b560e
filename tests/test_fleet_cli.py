"""`pyedge fleet` (pyedge/cli_fleet.py) without starting a federation: credentials Flower can
read, the app folder Flower can build, run settings parsed the way `--run-config` is."""
import os
import stat
import sys

import pytest

from pyedge.cli import main


def test_credentials_are_what_flower_reads(tmp_path, capsys):
    crypto = pytest.importorskip("cryptography", reason="needs cryptography (comes with flwr)")
    assert crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    assert main(["fleet", "credentials", "--out", str(tmp_path), "--hosts", "10.0.0.5,fleet.lan",
                 "--nodes", "2"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                           ec.ECDSA(cert.signature_hash_algorithm))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert sans.get_values_for_type(x509.DNSName) == ["fleet.lan"]
    for i in range(2):   # the formats flower-supernode and `flwr supernode register` load
        key = serialization.load_ssh_private_key((tmp_path / f"node{i}").read_bytes(), None)
        pub = serialization.load_ssh_public_key((tmp_path / f"node{i}.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert stat.S_IMODE(os.stat(tmp_path / f"node{i}").st_mode) == 0o600
    assert "register it" in capsys.readouterr().out


def test_private_keys_are_never_created_readable_by_others(tmp_path, monkeypatch):
    """The keys are created 0600, not written 0644 (umask 022) and chmodded afterwards: with
    chmod doing nothing, a key written the second way stays readable by every user."""
    pytest.importorskip("cryptography", reason="needs cryptography (comes with flwr)")
    from pyedge.fleet import deploy
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    old = os.umask(0o022)
    try:
        paths = deploy.make_certificates(tmp_path / "tls")
        priv, _ = deploy.make_node_key(tmp_path / "keys", "node0")
    finally:
        os.umask(old)
    for p in (paths["key"], priv):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert sorted(q.name for q in (tmp_path / "keys").iterdir()) == ["node0", "node0.pub"]


def test_app_dir_is_a_flower_app(capsys):
    pytest.importorskip("flwr", reason="needs flwr (pip install pyedge[fleet])")
    assert main(["fleet", "app-dir"]) == 0
    app = capsys.readouterr().out.strip()
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    cfg = tomllib.loads(open(os.path.join(app, "pyproject.toml")).read())
    comp = cfg["tool"]["flwr"]["app"]["components"]
    assert comp == {"serverapp": "pyedge.fleet.server_app:app",
                    "clientapp": "pyedge.fleet.client_app:app"}
    # every run setting the app declares is one RunSettings knows, with the same default
    from pyedge.fleet.settings import RunSettings
    assert RunSettings.from_config(cfg["tool"]["flwr"]["app"]["config"]) == RunSettings()
    from flwr.cli.build import build_fab_from_disk   # Flower can package it
    assert len(build_fab_from_disk(__import__("pathlib").Path(app))) > 0


def test_run_config_text_and_errors(tmp_path, capsys):
    from pyedge.cli_fleet import _run_config
    assert _run_config('local-steps=30 aggregation="exact" lr=0.5 client-eval=false') == {
        "local-steps": 30, "aggregation": "exact", "lr": 0.5, "client-eval": False}
    assert _run_config("") == {}
    code = main(["fleet", "local", "--nodes", "2", "--data", str(tmp_path / "a.npz"),
                 "--out", str(tmp_path / "o")])
    assert code != 0 and "names 1 file(s) for 2 node(s)" in capsys.readouterr().err
