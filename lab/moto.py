"""A real moto server (AWS APIs on loopback) for tests, benchmarks and the demo, and a few calls that
build an estate in it: a VPC with two subnets, a load balancer and its HTTPS or TLS listener.

``MotoServer.start()`` runs ``moto_server -H 127.0.0.1 -p PORT`` as a subprocess, waits until it answers
(about 1 s), and ``reset()`` clears every service's state (POST /moto-api/reset). moto is looser than
AWS (it accepts a key that does not match the certificate, deletes certificates a listener uses, adds
a fake root to ACM chains, invents IAM expiry dates): certpilot's connectors check these themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from lab.ports import free_port

__all__ = ["MotoServer", "LoadBalancerLab", "free_port", "make_load_balancer", "make_listener"]

ACCESS_KEY_ID = "testing"  # moto accepts any credentials
SECRET_ACCESS_KEY = "testing"




def _executable() -> str:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]' (the test extra has it)")
    return exe


class MotoServer:
    """One moto_server process on 127.0.0.1:``port``; ``url`` is the endpoint for every boto3 client."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._clients: dict[tuple[str, str], Any] = {}

    @classmethod
    def start(cls, workdir: Path, port: int | None = None, timeout: float = 20.0) -> MotoServer:
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        log = workdir / "moto.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([_executable(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "1"})
        server = cls(process, port, log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(server.url + "/moto-api/", timeout=1.0)
                return server
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"moto_server did not start on port {port}:\n"
                                       f"{log.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.05)

    def reset(self) -> None:
        """Forget every resource of every service."""
        httpx.post(self.url + "/moto-api/reset", timeout=10.0).raise_for_status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def client(self, service: str, region: str) -> Any:
        """A plain boto3 client on this server (for setting up an estate, not for certpilot's own calls)."""
        import boto3  # noqa: PLC0415

        if (service, region) not in self._clients:
            self._clients[(service, region)] = boto3.client(
                service, region_name=region, endpoint_url=self.url, aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY)
        return self._clients[(service, region)]


@dataclass(frozen=True)
class LoadBalancerLab:
    """A load balancer in a fresh VPC, and what a listener needs (a target group)."""

    region: str
    load_balancer_arn: str
    target_group_arn: str


def make_load_balancer(moto: MotoServer, region: str, name: str, kind: str = "application") -> LoadBalancerLab:
    """A VPC, two subnets, a load balancer (``application`` or ``network``) and a target group."""
    ec2, elb = moto.client("ec2", region), moto.client("elbv2", region)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{region}{zone}")
               ["Subnet"]["SubnetId"] for i, zone in ((1, "a"), (2, "b"))]
    lb = elb.create_load_balancer(Name=name, Subnets=subnets, Type=kind)["LoadBalancers"][0]
    tg = elb.create_target_group(Name=f"{name}-tg", Protocol="HTTP" if kind == "application" else "TCP", Port=80,
                                 VpcId=vpc)["TargetGroups"][0]
    return LoadBalancerLab(region, lb["LoadBalancerArn"], tg["TargetGroupArn"])


def make_listener(moto: MotoServer, lab: LoadBalancerLab, port: int, certificate_arn: str,
                  sni: tuple[str, ...] = (), protocol: str = "HTTPS") -> str:
    """An HTTPS (or TLS) listener with a default certificate and SNI certificates; returns its ARN."""
    elb = moto.client("elbv2", lab.region)
    listener = elb.create_listener(LoadBalancerArn=lab.load_balancer_arn, Protocol=protocol, Port=port,
                                   Certificates=[{"CertificateArn": certificate_arn}],
                                   DefaultActions=[{"Type": "forward", "TargetGroupArn": lab.target_group_arn}])
    arn = listener["Listeners"][0]["ListenerArn"]
    if sni:
        elb.add_listener_certificates(ListenerArn=arn, Certificates=[{"CertificateArn": a} for a in sni])
    return arn
