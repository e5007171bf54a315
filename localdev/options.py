"""What every part of the local stack shares: where it runs, its keys, the local AWS session."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aioboto3

if TYPE_CHECKING:
    pass

log = logging.getLogger("branchbuild.localdev")


ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = "000000000000"


@dataclass(frozen=True)
class Options:
    state: Path
    region: str
    localstack_endpoint: str | None
    localstack_port: int
    git_port: int
    http_port: int
    repositories: tuple[str, ...]
    demo: bool
    stack: str = "branchbuild-local"
    prefix: str = "branchbuild"
    codecommit_port: int = 0

    @property
    def endpoint(self) -> str:
        return self.localstack_endpoint or f"http://127.0.0.1:{self.localstack_port}"


@dataclass(frozen=True)
class Keys:
    client: Path
    known_hosts: Path
    host: Path

    def git_ssh_command(self) -> str:
        return (
            f"ssh -i {shlex.quote(str(self.client))} -o IdentitiesOnly=yes "
            "-o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={shlex.quote(str(self.known_hosts))}"
        )


def local_session(options: Options) -> aioboto3.Session:
    """LocalStack takes any credentials; these never reach AWS."""
    return aioboto3.Session(
        aws_access_key_id="test", aws_secret_access_key="test", region_name=options.region
    )


def aws_env(options: Options) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": options.endpoint,
        "AWS_REGION": options.region,
        "AWS_DEFAULT_REGION": options.region,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
