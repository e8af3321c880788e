"""What nginx and haproxy configurations say they serve (certpilot.server_configs)."""

from __future__ import annotations

from certpilot.server_configs import Served, is_server_config, parse

NGINX = b"""
# a comment naming ssl_certificate /not/this.pem;
http {
    ssl_certificate /etc/ssl/default.pem;   ssl_certificate_key /etc/ssl/default.key;
    server {
        listen 443 ssl http2;
        listen [::]:443 ssl;
        server_name www.example.test "example.test";
        ssl_certificate     certs/rsa.pem;
        ssl_certificate_key certs/rsa.key;
        ssl_certificate     /etc/ssl/ecdsa.pem;
        ssl_certificate_key /etc/ssl/ecdsa.key;
        location / { return 200 "ok; {not a block}"; }
    }
    server { listen 127.0.0.1:8443 ssl; server_name _; }
    server { listen 8444 ssl; ssl_certificate /etc/ssl/$ssl_server_name.pem; ssl_certificate_key k; }
    server { listen 80; }
}
"""

HAPROXY = b"""global
    stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners
    stats socket /run/haproxy/user.sock level user
    crt-base /etc/haproxy/certs

defaults
    mode http

frontend www   # comment
    bind :443 ssl crt site.pem crt "/srv/tls dir/"
    bind 127.0.0.1:8443 ssl crt-list /etc/haproxy/list.txt
backend app
    server app1 127.0.0.1:8080
"""


def test_nginx_servers_pairs_listen_and_names() -> None:
    found = parse(NGINX, "/etc/nginx/nginx.conf")
    assert found == [
        Served("nginx", "/etc/nginx/nginx.conf", "/etc/nginx/certs/rsa.pem", "/etc/nginx/certs/rsa.key",
               ("443", "[::]:443"), ("www.example.test", "example.test")),
        Served("nginx", "/etc/nginx/nginx.conf", "/etc/ssl/ecdsa.pem", "/etc/ssl/ecdsa.key",
               ("443", "[::]:443"), ("www.example.test", "example.test")),
        Served("nginx", "/etc/nginx/nginx.conf", "/etc/ssl/default.pem", "/etc/ssl/default.key",
               ("127.0.0.1:8443",), ("_",)),  # inherited from http
        Served("nginx", "/etc/nginx/nginx.conf", "/etc/ssl/default.pem", "/etc/ssl/default.key", ("8444",), ()),
        Served("nginx", "/etc/nginx/nginx.conf", "/etc/ssl/default.pem", "/etc/ssl/default.key", ("80",), ()),
    ]
    assert Served.from_dict(found[0].as_dict()) == found[0]


def test_haproxy_binds_crt_base_directories_and_the_admin_socket() -> None:
    found = parse(HAPROXY, "/etc/haproxy/haproxy.cfg")
    assert found == [
        Served("haproxy", "/etc/haproxy/haproxy.cfg", "/etc/haproxy/certs/site.pem", None, (":443",), (),
               "/run/haproxy/admin.sock"),
        Served("haproxy", "/etc/haproxy/haproxy.cfg", "/srv/tls dir", None, (":443",), (),
               "/run/haproxy/admin.sock"),
    ]
    assert found[1].serves("/srv/tls dir/a.pem") and not found[1].serves("/srv/tls dir/sub/a.pem")
    assert found[0].serves("/etc/haproxy/certs/site.pem") and not found[0].serves("/etc/haproxy/certs/other.pem")


def test_other_files_are_not_server_configurations() -> None:
    assert not is_server_config(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert not is_server_config(b"server { listen 80; }\n")
    assert parse(b"worker_processes 1;\n", "/etc/nginx/nginx.conf") == []
    assert is_server_config(NGINX) and is_server_config(HAPROXY)
