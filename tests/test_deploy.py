"""Static checks of docker-compose.yml and the Dockerfiles (no Docker engine runs here).

They keep the deployment correct by construction: every service and file it names exists,
every TID_* variable is a real setting, every command is a real `tid` command, and the images
install the project with the same pip commands as the Makefile.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from cli.main import app as cli_app
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _dockerfiles() -> list[Path]:
    return sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "api", "worker", "worker-cpu", "reconciler"} <= services.keys()
    assert services["worker"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert "healthcheck" in services["api"]
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "worker-cpu"):
        assert "data:/data" in services[name]["volumes"]  # one shared artifact volume
    assert services["flower"]["profiles"] == ["monitor"]
    assert services["flower"]["command"][:2] == ["tid", "flower"]


def test_compose_restarts_every_long_running_service(compose: dict[str, Any]) -> None:
    """Every service of the stack is long-running (none is a one-shot job): a crash, the OOM
    killer or a host reboot must not leave it down until someone notices."""
    for name, service in compose["services"].items():
        restart = service.get("restart", "no")
        assert restart in ("always", "unless-stopped") or restart.startswith("on-failure"), name


def test_compose_keeps_flower_on_loopback_behind_basic_auth(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]  # the host's loopback only
    # inside its container Flower listens on every interface, which `tid flower` refuses
    # without credentials; they come from the operator's environment, never from this file
    assert flower["command"][-2:] == ["--address", "0.0.0.0"]
    assert flower["environment"]["TID_FLOWER_BASIC_AUTH"] == "${TID_FLOWER_BASIC_AUTH:-}"
    for name, service in compose["services"].items():  # nor the database or the broker
        for port in service.get("ports", []):
            assert name in ("api", "flower"), f"{name} publishes {port}"


def test_compose_requires_no_variable_for_an_optional_service(compose: dict[str, Any]) -> None:
    """Compose interpolates every service before it picks the profiles to run, so a
    `${VAR:?}` in an optional service would stop `up` of the stack without it."""
    for name, service in compose["services"].items():
        if service.get("profiles"):
            assert ":?" not in yaml.safe_dump(service), name


def test_compose_env_names_are_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {f"TID_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if key.startswith("TID_"):
                assert key in fields, f"{name}: {key} is not a setting"
                # `${VAR:-default}`, as compose interpolates it with VAR unset
                monkeypatch.setenv(key, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value))
        if "TID_DATABASE_URL" in env:  # the values parse as the settings they name
            settings = Settings()
            assert settings.database_url.startswith("postgresql+psycopg://")
            assert settings.broker_url.startswith("redis://")


def test_compose_builds_reference_existing_files(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_compose_commands_are_real_cli_commands(compose: dict[str, Any]) -> None:
    commands = get_command(cli_app).commands  # type: ignore[attr-defined]
    for name, service in compose["services"].items():
        command = service.get("command")
        if command and command[0] == "tid":
            assert command[1] in commands, f"{name}: tid {command[1]} does not exist"


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_copies_existing_paths_and_runs_real_commands(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} missing"
    commands = get_command(cli_app).commands  # type: ignore[attr-defined]
    for tid_call in re.findall(r"\btid ([a-z]+)", text):
        assert tid_call in commands, f"{dockerfile.name}: tid {tid_call} does not exist"


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_installs_like_the_makefile(dockerfile: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    make_lines = re.findall(r"\$\(PY\) (-m pip install .+)", makefile)
    docker_lines = re.findall(
        r"python (-m pip install .+?)(?: \\|$| &&)", dockerfile.read_text(), re.M
    )
    assert len(docker_lines) == len(make_lines) == 2
    extras = re.compile(r"^\.\[([a-z,]+)\]$")
    for make, docker in zip(make_lines, docker_lines, strict=True):
        make_args = [a for a in shlex.split(make) if a != "-e"]  # the image is not editable
        docker_args = shlex.split(docker)
        assert make_args[:-1] == docker_args[:-1]  # same command and options
        make_m, docker_m = extras.match(make_args[-1]), extras.match(docker_args[-1])
        if make_m is None:
            assert make_args == docker_args
            continue
        assert docker_m is not None, docker
        docker_extras = set(docker_m.group(1).split(","))
        assert docker_extras <= set(make_m.group(1).split(",")) - {"dev"}
        if "api" in dockerfile.name:
            assert "core" not in docker_extras  # the API image never gets torch
        else:
            assert {"core", "service"} <= docker_extras


@pytest.mark.slow
def test_the_installed_package_carries_its_migrations_and_dashboard(tmp_path: Path) -> None:
    """The images install the project as a wheel (not editable): what `tid db upgrade` and
    the dashboard read must be in it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (
        "store/db/migrations/env.py",
        "api/static/index.html",
        "api/static/app.js",
        "api/static/vendor/uplot/uPlot.iife.min.js",
        "api/static/docs.html",
        "api/static/docs.js",
        "api/static/vendor/swagger-ui/swagger-ui-bundle.js",
        "api/static/vendor/swagger-ui/swagger-ui.css",
        "api/static/vendor/swagger-ui/LICENSE",
    ):
        assert path in names, path
    versions = {p.name for p in (ROOT / "store/db/migrations/versions").glob("*.py")}
    assert {f"store/db/migrations/versions/{v}" for v in versions} <= names
