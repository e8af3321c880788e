"""Discovery of what nginx and haproxy serve: their configurations, found by the globs, are read as such
over a real SSH connection, the certificate and key files they name are read too (globbed or not), and
each certificate file says how it is served (details["served_by"]); a named file that is missing is a
Problem naming the configuration."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certpilot.discovery import split
from connectors.ssh import SshConnection
from connectors.ssh_source import SshSource
from lab.haproxy import HaproxyInstance
from lab.nginx import NginxInstance
from lab.sshd import SshServer
from tests.integration.ssh.conftest import NGINX_SITES


def test_configurations_name_what_is_served(sshd: SshServer, ssh: SshConnection, nginx: NginxInstance,
                                            haproxy: HaproxyInstance) -> None:
    broken = sshd.home / "broken-nginx"
    broken.mkdir(exist_ok=True)
    (broken / "site.conf").write_text("server {\n  listen 443 ssl;\n  ssl_certificate missing/cert.pem;\n"
                                      "  ssl_certificate_key missing/key.pem;\n}\n")
    sshd.chown(broken)
    source = SshSource(ssh, [str(nginx.conf), str(haproxy.conf), str(broken / "*.conf")], alias="web")
    found, problems = split(source.discover())
    by_path = {f.details["path"]: f for f in found}
    for name in NGINX_SITES:
        site = nginx.site(name)
        item = by_path[str(site.certificate_path)]  # read although no glob matches it
        [served] = item.details["served_by"]
        assert served == {"server": "nginx", "config": str(nginx.conf), "certificate_path": str(site.certificate_path),
                          "key_path": str(site.key_path), "listen": [f"127.0.0.1:{site.port}"],
                          "server_names": [name], "runtime_socket": None}
        assert item.details["key_path"] == str(site.key_path) and item.details["key_mode"] == "0600"
    lb = by_path[str(haproxy.pem_path)]
    [served] = lb.details["served_by"]
    assert (served["server"], served["listen"], served["runtime_socket"], served["key_path"]) == (
        "haproxy", [f"127.0.0.1:{haproxy.port}"], str(haproxy.socket_path), None)
    on_disk = x509.load_pem_x509_certificates(haproxy.pem_path.read_bytes())[0]
    assert lb.certificates[0] == on_disk.public_bytes(serialization.Encoding.DER)
    assert {p.reason for p in problems} == {f"named by {broken / 'site.conf'}, but there is no such file"}
    assert sorted(p.locator.rsplit("/", 2)[-1] for p in problems) == ["cert.pem", "key.pem"]
