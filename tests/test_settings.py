"""Settings: defaults, parsing from the environment, one clear line for a bad configuration."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.errors import ConfigurationError
from service.settings import MiB, load_settings

REQUIRED = {
    "BRANCHBUILD_QUEUE_URL": "https://sqs/intake.fifo",
    "BRANCHBUILD_WORK_QUEUE_URL": "https://sqs/work.fifo",
    "BRANCHBUILD_BUCKET": "my-bucket",
}


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in REQUIRED.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert s.key_template == "{repository}/{branch}/{commit}.zip"
    assert s.project_template == "{repository}"
    assert s.protected_branches == ("test", "develop", "staging")
    assert s.git_url_template == (
        "ssh://{ssh_key_id}@git-codecommit.{region}.amazonaws.com/v1/repos/{repository}"
    )
    assert s.shutdown_grace < 120
    assert s.part_size >= 5 * MiB
    assert s.build_tags is False


def test_environment_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in REQUIRED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BRANCHBUILD_PROTECTED_BRANCHES", " main, release/* ,")
    monkeypatch.setenv("BRANCHBUILD_CONCURRENCY", "3")
    monkeypatch.setenv("BRANCHBUILD_BUILD_TAGS", "true")
    s = load_settings()
    assert s.protected_branches == ("main", "release/*")
    assert s.concurrency == 3 and s.build_tags is True


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BRANCHBUILD_QUEUE_URL", None, "BRANCHBUILD_QUEUE_URL is required"),
        ("BRANCHBUILD_CONCURRENCY", "many", "BRANCHBUILD_CONCURRENCY: "),
        ("BRANCHBUILD_CONCURRENCY", "0", "BRANCHBUILD_CONCURRENCY: "),
        ("BRANCHBUILD_PART_SIZE", "1024", "BRANCHBUILD_PART_SIZE: "),
        (
            "BRANCHBUILD_KEY_TEMPLATE",
            "{repository}/{nope}.zip",
            "BRANCHBUILD_KEY_TEMPLATE: unknown field",
        ),
        ("BRANCHBUILD_KEY_TEMPLATE", "{repository}/{branch}.zip", "must contain {commit}"),
        ("BRANCHBUILD_GIT_URL_TEMPLATE", "https://x/{repository}", "BRANCHBUILD_GIT_URL_TEMPLATE"),
        ("BRANCHBUILD_WAIT_TIME", "21", "BRANCHBUILD_WAIT_TIME"),
        ("BRANCHBUILD_VISIBILITY_TIMEOUT", "1", "BRANCHBUILD_VISIBILITY_TIMEOUT: "),
        # A replaced setting is refused by name, not silently ignored.
        ("BRANCHBUILD_HEARTBEAT_INTERVAL", "30", "BRANCHBUILD_HEARTBEAT_INTERVAL is no longer"),
    ],
)
def test_bad_configuration_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str | None, expected: str
) -> None:
    for k, v in REQUIRED.items():
        monkeypatch.setenv(k, v)
    if value is None:
        monkeypatch.delenv(variable)
    else:
        monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in REQUIRED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BRANCHBUILD_CONCURRENCY", "lots")
    result = subprocess.run(
        [sys.executable, "-m", "service", "run"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "branchbuild: configuration error: BRANCHBUILD_CONCURRENCY"
    )


def test_missing_ssh_key_fails_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for k, v in REQUIRED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BRANCHBUILD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BRANCHBUILD_SSH_KEY_FILE", "/nonexistent/key")
    result = subprocess.run(
        [sys.executable, "-m", "service", "run"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "BRANCHBUILD_SSH_KEY_FILE" in result.stderr


def test_production_cannot_select_the_local_build_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backend that runs a repository's buildspec on the host is not in the service: asking
    for it stops the production command at start-up with the reason."""
    for k, v in REQUIRED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BRANCHBUILD_BUILD_BACKEND", "local")
    result = subprocess.run(
        [sys.executable, "-m", "service", "run"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == (
        "branchbuild: configuration error: BRANCHBUILD_BUILD_BACKEND=local is for development "
        "only (it runs the repository's buildspec commands on this host), and this service has "
        "no such backend: `python -m localdev.service` runs the service with it\n"
    )


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in REQUIRED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BRANCHBUILD_SSH_KEY_FILE", "")
    monkeypatch.setenv("BRANCHBUILD_SSH_PRIVATE_KEY", "key material")
    assert load_settings().ssh_key_file is None
