"""Local stand-ins for a real estate, on loopback: a TLS endpoint farm, sshd, nginx, haproxy, a moto
server and a Key Vault REST server. The tests, the benchmarks and the main job start them from here."""
