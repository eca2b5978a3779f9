"""The deployment files in ``ops/`` agree with the code.

Docker and Kubernetes cannot run here, so these tests are how the manifests are checked: every file parses,
every ``routet2i`` command a manifest runs parses with the real CLI (click, options and their types), every
``ROUTET2I_*`` variable is a field of :class:`Settings` and every container's environment builds valid
settings, KEDA's list names are the queues the Celery app declares, and names that refer to each other
(Deployments, Services, ConfigMaps, volumes, probes, scrape targets) resolve.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml
from pydantic import BaseModel

from api.app import create_app
from cli.main import main
from core.settings import Settings
from worker.transport import create_celery

OPS = Path(__file__).resolve().parents[1] / "ops"
ROOT = OPS.parent
K8S = OPS / "k8s"
IMAGE = "routet2i"


# --- helpers ---------------------------------------------------------------------------------------------


def parse_cli(argv: list[str]) -> tuple[click.Command, dict[str, Any]]:
    """Parse ``argv`` (starting with ``routet2i``) with the real CLI; raises click errors for bad usage."""
    assert argv and argv[0] == "routet2i", f"not a routet2i command: {argv}"
    command: click.Command = main
    rest = list(argv[1:])
    while isinstance(command, click.Group):
        assert rest, f"{argv}: missing a sub-command"
        name, *rest = rest
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"{argv}: no command {name!r}"
        command = sub
    context = command.make_context(" ".join(argv[:2]), rest)
    return command, context.params


def check_env_name(name: str) -> None:
    """``ROUTET2I_A__B`` must name field ``a`` of Settings and field ``b`` of its model."""
    assert name.startswith("ROUTET2I_"), name
    model: type[BaseModel] = Settings
    parts = name.removeprefix("ROUTET2I_").lower().split("__")
    for depth, part in enumerate(parts):
        assert part in model.model_fields, f"{name}: {part!r} is not a setting of {model.__name__}"
        annotation = model.model_fields[part].annotation
        if depth < len(parts) - 1:
            assert isinstance(annotation, type) and issubclass(annotation, BaseModel), f"{name}: {part} has no fields"
            model = annotation


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build Settings from exactly ``env`` (the variables a container gets), as the process would."""
    for name in list(os.environ):
        if name.startswith("ROUTET2I_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("ROUTET2I_"):
            check_env_name(name)
            monkeypatch.setenv(name, value)
    return Settings.from_env()


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def celery_queues() -> set[str]:
    return {queue.name for queue in create_celery(Settings()).conf.task_queues}


@pytest.fixture(scope="module")
def api_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    database = tmp_path_factory.mktemp("routes") / "routes.db"
    app = create_app(Settings(database_url=f"sqlite:///{database}"))
    return {rule.rule for rule in app.url_map.iter_rules()}


# --- Dockerfile ----------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (OPS / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_runs_the_cli_and_copies_what_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    instructions = dockerfile_instructions()
    entrypoint = [json.loads(v) for k, v in instructions if k == "ENTRYPOINT"]
    assert entrypoint == [["routet2i"]]
    (cmd,) = [json.loads(v) for k, v in instructions if k == "CMD"]
    parse_cli(["routet2i", *cmd])
    for kind, value in instructions:
        if kind == "COPY":
            *sources, _ = value.split()
            assert all((ROOT / s).exists() for s in sources), value
    env = dict(
        pair.split("=", 1)
        for kind, value in instructions
        if kind == "ENV"
        for pair in shlex.split(value)
        if "=" in pair
    )
    assert settings_from(env, monkeypatch).image_dir == Path("/data/images")


# --- docker compose ------------------------------------------------------------------------------------


def compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((OPS / name).read_text())


def routet2i_services(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in doc["services"].items():
        if str(service.get("image", "")).startswith(IMAGE + ":") or "build" in service:
            yield name, service


def test_compose_services_run_valid_commands_with_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = compose("compose.yaml")
    services = dict(routet2i_services(doc))
    assert set(services) == {"migrate", "api", "router", "edge", "cloud", "webhooks", "learn", "flower"}
    assert {"postgres", "redis", "prometheus"} <= set(doc["services"])

    consumed = {}
    for name, service in services.items():
        command, params = parse_cli(["routet2i", *service["command"]])
        settings = settings_from({k: str(v) for k, v in service["environment"].items()}, monkeypatch)
        assert settings.database_url.startswith("postgresql+psycopg://routet2i:routet2i@postgres:5432/")
        assert urlparse(settings.broker_url).hostname == "redis"
        if command.name == "worker":
            consumed[params["queue"]] = name
        if name != "migrate":
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        build = service["build"]
        assert (OPS / build["context"] / build["dockerfile"]).resolve() == OPS / "Dockerfile"
    assert consumed == {"route": "router", "edge": "edge", "cloud": "cloud"}
    assert set(consumed) == celery_queues()
    assert parse_cli(["routet2i", *services["migrate"]["command"]])[0].name == "upgrade"


def test_compose_gpu_overlay_only_extends_worker_services(monkeypatch: pytest.MonkeyPatch) -> None:
    base = compose("compose.yaml")["services"]
    overlay = compose("compose.gpu.yaml")["services"]
    assert set(overlay) == {"edge", "cloud"}
    for name, service in overlay.items():
        merged = {**base[name]["environment"], **service["environment"]}
        settings = settings_from({k: str(v) for k, v in merged.items()}, monkeypatch)
        assert settings.tier(name).device == "cuda"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_prometheus_scrapes_ports_and_paths_that_exist(api_routes: set[str]) -> None:
    services = compose("compose.yaml")["services"]
    prometheus = services["prometheus"]
    mount = next(v for v in prometheus["volumes"] if v.startswith("./prometheus:"))
    host_dir = OPS / mount.split(":")[0]
    config = yaml.safe_load((host_dir / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        rules = yaml.safe_load((host_dir / Path(rule_file).name).read_text())
        assert all("alert" in r and "expr" in r for g in rules["groups"] for r in g["rules"])
    targets = {
        job["job_name"]: (job["metrics_path"], target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert set(targets) == {"routet2i-api", "flower"}
    for _, target in targets.values():
        service, port = target.split(":")
        _, params = parse_cli(["routet2i", *services[service]["command"]])
        assert params["port"] == int(port)
    assert targets["routet2i-api"][0] in api_routes


def test_prometheus_presents_the_metrics_token_the_compose_api_wants(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    services = compose("compose.yaml")["services"]
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "routet2i-api"]
    assert job["authorization"]["type"] == "Bearer"
    env = {k: str(v) for k, v in services["api"]["environment"].items()}
    settings = settings_from(env, monkeypatch)
    assert settings.metrics_token is not None
    assert settings.metrics_token.get_secret_value() == job["authorization"]["credentials"]
    app = create_app(
        settings.model_copy(
            update={"database_url": f"sqlite:///{tmp_path / 'm.db'}", "broker_url": "redis://127.0.0.1:1/0"}
        )
    )
    headers = {"Authorization": f"Bearer {job['authorization']['credentials']}"}
    assert app.test_client().get(job["metrics_path"], headers=headers).status_code == 200
    assert app.test_client().get(job["metrics_path"]).status_code == 401


# --- Kubernetes ----------------------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_all(path)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    configs, secrets = by_kind("ConfigMap"), by_kind("Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configs[source["configMapRef"]["name"]]["data"])
        else:
            env.update(secrets[source["secretRef"]["name"]]["stringData"])
    env.update({item["name"]: str(item["value"]) for item in container.get("env", [])})
    return env


def worker_queue(deployment: dict[str, Any]) -> str | None:
    (container,) = containers(deployment)
    command, params = parse_cli([*container["command"], *container["args"]])
    return params["queue"] if command.name == "worker" else None


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert all(d["apiVersion"] and d["kind"] and d["metadata"]["name"] for d in k8s_documents())


def test_every_container_runs_a_valid_command_with_valid_settings(
    monkeypatch: pytest.MonkeyPatch, api_routes: set[str]
) -> None:
    workloads = [*by_kind("Deployment").values(), *by_kind("Job").values()]
    claims = set(by_kind("PersistentVolumeClaim"))
    checked = 0
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in pod["containers"]:
            if container["image"] != IMAGE:
                continue
            parse_cli([*container["command"], *container["args"]])
            settings = settings_from(container_env(container), monkeypatch)
            assert settings.database_url.startswith("postgresql+psycopg://")
            for probe in ("readinessProbe", "livenessProbe"):
                path = container.get(probe, {}).get("httpGet", {}).get("path")
                if path is not None and "flower" not in container["args"]:
                    assert path in api_routes, f"{workload['metadata']['name']}: no route {path}"
            checked += 1
    assert checked == 8  # migrate, api, three workers, the webhook dispatcher, the learning loop, flower


def test_one_worker_deployment_per_queue_with_gpus_on_the_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    deployments = by_kind("Deployment")
    per_queue: dict[str, list[str]] = {}
    for name, deployment in deployments.items():
        if deployment["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE:
            queue = worker_queue(deployment)
            if queue is not None:
                per_queue.setdefault(queue, []).append(name)
    assert {q: len(names) for q, names in per_queue.items()} == {q: 1 for q in celery_queues()}
    for queue, (name,) in per_queue.items():
        (container,) = containers(deployments[name])
        limits = container["resources"].get("limits", {})
        if queue == "route":
            assert "nvidia.com/gpu" not in limits
        else:
            assert limits["nvidia.com/gpu"] == 1
            assert settings_from(container_env(container), monkeypatch).tier(queue).device == "cuda"


def test_api_service_selects_the_api_pods() -> None:
    deployment = by_kind("Deployment")["routet2i-api"]
    service = by_kind("Service")["routet2i-api"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = containers(deployment)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = service["spec"]["ports"]
    _, params = parse_cli([*container["command"], *container["args"]])
    assert port_names[port["targetPort"]] == params["port"]


def test_keda_scales_each_queue_worker_on_its_celery_list() -> None:
    deployments = by_kind("Deployment")
    scaled = by_kind("ScaledObject")
    broker = urlparse(by_kind("ConfigMap")["routet2i-config"]["data"]["ROUTET2I_BROKER_URL"])
    queues_scaled = set()
    for name, scaled_object in scaled.items():
        target = scaled_object["spec"]["scaleTargetRef"]["name"]
        queue = worker_queue(deployments[target])
        (trigger,) = scaled_object["spec"]["triggers"]
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert meta["listName"] == queue, f"{name} scales {target} (queue {queue}) on list {meta['listName']}"
        assert meta["address"] == f"{broker.hostname}:{broker.port}"
        assert meta["databaseIndex"] == broker.path.lstrip("/")
        assert int(meta["listLength"]) >= 1
        queues_scaled.add(meta["listName"])
    assert queues_scaled == celery_queues()


# --- Procfile and the no-container script -----------------------------------------------------------------


def procfile_commands() -> dict[str, list[str]]:
    commands = {}
    for line in (OPS / "Procfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, command = line.split(":", 1)
        # ${VAR:-default} as the shell expands it when VAR is unset
        command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)
        assert "$" not in command, f"unexpanded variable in {line!r}"
        assert name not in commands
        commands[name] = shlex.split(command)
    return commands


def test_procfile_runs_every_process_with_valid_commands() -> None:
    queues = {}
    for name, argv in procfile_commands().items():
        command, params = parse_cli(argv)
        if command.name == "worker":
            queues[params["queue"]] = name
    assert set(queues) == celery_queues()
    assert {"api", "flower"} <= set(procfile_commands())


def test_run_local_script_is_valid_bash_and_reads_the_procfile() -> None:
    script = OPS / "run-local.sh"
    assert script.stat().st_mode & 0o111, "run-local.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "/Procfile" in text and "routet2i db upgrade" in text
    parse_cli(["routet2i", "db", "upgrade"])


# --- the checks themselves -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["routet2i", "worker", "--queue", "gpu"],
        ["routet2i", "worker", "--queue", "edge", "--concurency", "2"],
        ["routet2i", "serve"],
        ["routet2i", "api", "--port", "eighty"],
    ],
)
def test_parse_cli_refuses_what_the_cli_refuses(argv: list[str]) -> None:
    with pytest.raises((click.UsageError, AssertionError)):
        parse_cli(argv)


@pytest.mark.parametrize("name", ["ROUTET2I_EDGE__MODLE", "ROUTET2I_GPU", "ROUTET2I_CLOUD_BUDGET__X", "OTHER"])
def test_check_env_name_refuses_unknown_settings(name: str) -> None:
    with pytest.raises(AssertionError):
        check_env_name(name)


# --- commands in the documentation ----------------------------------------------------------------------

DOCUMENTED = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
"""Every page whose shell examples must run: the README and each page under docs/."""

ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_commands(text: str) -> Iterator[list[str]]:
    """Each simple command of the ``sh`` and ``bash`` blocks of a Markdown ``text``, as the shell splits it:
    continuation lines joined, comments dropped, and commands separated at ``;``, ``&``, ``&&``, ``|``, ``||``."""
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(re.sub(r"(^|\s)#.*", "", line), posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, ""
            command: list[str] = []
            for word in [*lexer, ";"]:
                if set(word) <= set(";&|"):
                    if command:
                        yield command
                    command = []
                else:
                    command.append(word)


def documented_commands(path: Path = ROOT / "docs" / "operations.md") -> list[list[str]]:
    """``routet2i ...`` invocations in the ``sh`` and ``bash`` blocks of ``path``, without the ``NAME=value``
    assignments in front of them (each ``ROUTET2I_*`` name among those must be a setting)."""
    commands = []
    for words in shell_commands(path.read_text(encoding="utf-8")):
        while words and ASSIGNMENT.match(words[0]):
            name = words.pop(0).split("=", 1)[0]
            if name.startswith("ROUTET2I_"):
                check_env_name(name)
        if words and words[0] == "routet2i":
            commands.append(_without_redirections(words))
    return commands


def _without_redirections(words: list[str]) -> list[str]:
    """``words`` without the shell's output redirections (``> file``, ``2>&1``), which are not the command's."""
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in (">", ">>", "2>", "2>>"):
            skip = True
        elif not re.fullmatch(r"\d?>>?(&\d|\S+)", word):
            kept.append(word)
    return kept


def create_inputs(argv: list[str], root: Path) -> None:
    """Create under ``root`` the files and directories that ``argv``'s options must find while parsing (a replay
    log an earlier example wrote, a prompts file), so that only the command's own usage is checked."""
    command: click.Command | None = main
    rest = list(argv[1:])
    while isinstance(command, click.Group) and rest:
        command = command.get_command(click.Context(command), rest.pop(0))
    if command is None:
        return  # not a command: parse_cli says so
    wanted = {
        opt: param.type
        for param in command.params
        if isinstance(param, click.Option)
        and (
            (isinstance(param.type, click.File) and "r" in param.type.mode)
            or (isinstance(param.type, click.Path) and param.type.exists)
        )
        for opt in param.opts
    }
    for word, value in itertools.pairwise(rest):
        kind = wanted.get(word)
        if kind is None or value == "-":
            continue
        target = root / value
        if isinstance(kind, click.Path) and not kind.file_okay:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("a prompt\n")


def check_commands(commands: list[list[str]], root: Path) -> None:
    for argv in commands:
        create_inputs(argv, root)
        parse_cli(argv)


def test_every_command_in_the_operations_guide_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = documented_commands()
    assert len(commands) >= 10
    monkeypatch.chdir(tmp_path)
    check_commands(commands, tmp_path)


@pytest.mark.parametrize("page", DOCUMENTED, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_command_in_the_readme_and_the_docs_parses(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = documented_commands(page)
    monkeypatch.chdir(tmp_path)
    check_commands(commands, tmp_path)


def test_the_documentation_check_reads_what_the_shell_would_run(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "ROUTET2I_CLOUD_BUDGET=0.5 routet2i worker --queue route &   # a comment's quote\n"
        "ROUTET2I_DATABASE_URL=sqlite:///x.db \\\n  routet2i db upgrade && routet2i queues --json\n"
        "curl -s localhost/metrics | grep -E 'routet2i_(cloud_|cost)'\n"
        "```\n"
        "```sh\nroutet2i reconcile --once; echo done\n```\n"
        "```python\nroutet2i = 'not a shell block'\n```\n"
    )
    assert documented_commands(page) == [
        ["routet2i", "worker", "--queue", "route"],
        ["routet2i", "db", "upgrade"],
        ["routet2i", "queues", "--json"],
        ["routet2i", "reconcile", "--once"],
    ]
    page.write_text("```sh\nROUTET2I_CLOUD_BUDGT=0.5 routet2i queues\n```\n")
    with pytest.raises(AssertionError, match="'cloud_budgt' is not a setting"):
        documented_commands(page)


@pytest.mark.parametrize(
    "argv", [["status"], ["stats"], ["queues"], ["db", "current"], ["tenant", "list"], ["dlq", "list"], ["reconcile"]]
)
def test_read_commands_offer_json(argv: list[str]) -> None:
    command, _ = parse_cli(["routet2i", *argv, *(["JOB_ID"] if argv == ["status"] else [])])
    assert "--json" in {opt for param in command.params for opt in getattr(param, "opts", [])}
