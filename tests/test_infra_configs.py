"""Every config under infra/ parsed and held to infra/contract.yaml and to the code.

No cluster here: these tests catch the drift that would only show on one (an image name that
differs between two manifests, an env var the code never reads, a `--set` key the config
refuses, a worker group without GPUs, a secret written into a file).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CONTRACT = yaml.safe_load((INFRA / "contract.yaml").read_text(encoding="utf-8"))
IMAGE = CONTRACT["image"]
ENV_NAMES = set(CONTRACT["env"])
SECRET_ENV = {name for name, spec in CONTRACT["env"].items() if spec.get("secret")}
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml"))
AWS_CLUSTER = INFRA / "ray" / "cluster-aws.yaml"
JOB_TEMPLATE = INFRA / "prefect" / "base-job-template.json"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
# Variable-name prefixes that belong to the systems the contract covers.
PROJECT_PREFIXES = ("GARA_", "MLFLOW_", "AWS_", "PREFECT_", "RAY_", "DVC_")


def text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in {".pyc"} and not p.name.endswith(".lock"))


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in K8S_FILES
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_docs() if doc["kind"] == kind]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def containers(node: Any) -> list[dict]:
    return [c for key, value in walk(node) if key == "containers" for c in value]


def pod_specs_of_ray(doc: dict) -> tuple[dict, list[dict]]:
    """(head pod spec, [worker group]) of a RayCluster or of a RayJob's cluster."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return spec["headGroupSpec"], spec["workerGroupSpecs"]


def ray_docs() -> list[dict]:
    return by_kind("RayCluster") + by_kind("RayJob")


def aws_cluster() -> dict:
    return yaml.safe_load(AWS_CLUSTER.read_text(encoding="utf-8"))


def job_template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text(encoding="utf-8"))


def docker_env(options: list[str]) -> dict[str, str]:
    """NAME=value pairs of `--env` / `-e` in docker run options."""
    env = {}
    for option in options:
        tokens = shlex.split(option)
        for flag, value in zip(tokens, tokens[1:], strict=False):
            if flag in ("--env", "-e"):
                name, _, val = value.partition("=")
                env[name] = val
    return env


def load_stack_module():
    spec = importlib.util.spec_from_file_location("gara_local_stack", INFRA / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the image -----------------------------------------------------------------------------
def test_image_tag_is_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    repository, _, tag = IMAGE.rpartition(":")
    assert tag == version, f"image tag {tag} != package version {version}: bump infra/contract.yaml too"
    assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+", repository), "image repository must be lowercase"


def test_every_config_and_doc_names_the_one_image() -> None:
    used: dict[str, set[str]] = {}
    for path, doc in k8s_docs():
        for container in containers(doc):
            used.setdefault(container["image"], set()).add(f"{path.name}:{container['name']}")
    used.setdefault(aws_cluster()["docker"]["image"], set()).add(AWS_CLUSTER.name)
    template_image = job_template()["variables"]["properties"]["image"]["default"]
    used.setdefault(template_image, set()).add(JOB_TEMPLATE.name)
    assert set(used) == {IMAGE}, f"images other than {IMAGE}: {used}"
    # Any other mention (docs, comments, Makefile) names the same image.
    pattern = re.compile(r"[\w.-]+/[\w.-]+/gara-sam:[\w.-]+")
    for path in [*text_files(), ROOT / "Makefile", ROOT / "README.md"]:
        for found in pattern.findall(path.read_text(encoding="utf-8")):
            assert found == IMAGE, f"{path.relative_to(ROOT)} names {found}, not {IMAGE}"


def test_dockerfile_builds_python311_from_the_lock_with_the_package() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11[-\w.]*$", text, re.M)
    assert "uv pip sync --system /tmp/requirements-cluster.lock" in text
    assert "COPY infra/docker/requirements-cluster.lock" in text
    assert re.search(r"uv pip install --system --no-deps \.", text)
    assert re.search(rf"^WORKDIR {re.escape(CONTRACT['workdir'])}$", text, re.M)
    assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.M), "the image must not run as root"
    env_names = set(re.findall(r"^\s+(?:ENV\s+)?([A-Z][A-Z0-9_]+)=", text, re.M))
    project_vars = {n for n in env_names if n.startswith(PROJECT_PREFIXES)}
    assert project_vars <= ENV_NAMES, f"Dockerfile sets, contract lacks: {project_vars - ENV_NAMES}"


def test_dockerignore_is_an_allowlist_of_existing_files() -> None:
    lines = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(
        encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "start from nothing: never ship .venv, data, mlflow.db or .stack/env.sh"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    assert {"gara", "pyproject.toml", "README.md", "params.yaml", "infra/docker/requirements-cluster.lock"} \
        <= set(allowed)
    # pipelines/ and prefect.yaml belong to the Prefect flows: shipped once they exist.
    missing = [p for p in allowed if not (ROOT / p).exists() and p not in {"pipelines", "prefect.yaml"}]
    assert not missing, f"the allowlist names files that do not exist: {missing}"


def test_cluster_lock_pins_everything_the_project_lock_pins() -> None:
    def pins(path: Path) -> dict[str, str]:
        return dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", path.read_text(encoding="utf-8"), re.M))

    project = pins(ROOT / "requirements.lock")
    cluster = pins(INFRA / "docker" / "requirements-cluster.lock")
    drift = {name: (version, cluster.get(name)) for name, version in project.items()
             if cluster.get(name) != version}
    assert not drift, f"re-compile infra/docker/requirements-cluster.lock (see its .in): {drift}"
    assert {"prefect-kubernetes", "aiohttp-cors", "grpcio"} <= set(cluster)  # worker, ray[default,client]
    assert cluster["ray"] == CONTRACT["ray_version"]


# --- environment variables and secrets ----------------------------------------------------
def env_names_read_by_code() -> set[str]:
    """Project-prefixed names the Python code reads: os.environ[...] / .get / .setdefault /
    os.getenv arguments, and string constants assigned to *_ENV names."""
    names: set[str] = set()
    for folder in ("gara", "pipelines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                value = None
                if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                    func = ast.unparse(node.func)
                    if func.endswith(("environ.get", "environ.setdefault", "environ.pop", "getenv")):
                        value = node.args[0].value
                elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
                    if isinstance(node.slice, ast.Constant):
                        value = node.slice.value
                elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                    if any(isinstance(t, ast.Name) and t.id.endswith("_ENV") for t in node.targets):
                        value = node.value.value
                if isinstance(value, str) and value.startswith(PROJECT_PREFIXES):
                    names.add(value)
    return names


def test_the_contract_lists_every_variable_the_code_reads() -> None:
    read = env_names_read_by_code()  # source only: importing gara.models would load torch
    # gara/models/checkpoints.py: CACHE_ENV; gara/data/storage.py: S3_ENDPOINT_ENV; gara/tracking.py
    assert {"MLFLOW_TRACKING_URI", "GARA_CACHE_DIR", "GARA_S3_ENDPOINT_URL"} <= read
    assert read <= ENV_NAMES, f"add to infra/contract.yaml env: {sorted(read - ENV_NAMES)}"


def test_every_env_var_a_config_sets_is_in_the_contract() -> None:
    used: dict[str, str] = {}
    for path, doc in k8s_docs():
        if doc["kind"] == "ConfigMap":
            used.update({name: path.name for name in doc["data"]})
        for container in containers(doc):
            used.update({e["name"]: path.name for e in container.get("env", [])})
    for keys in CONTRACT["k8s_secrets"].values():  # envFrom a Secret: its keys become variables
        used.update({key: "contract.yaml k8s_secrets" for key in keys})
    cluster = aws_cluster()["docker"]
    used.update({name: AWS_CLUSTER.name for name in docker_env(cluster["run_options"])})
    used.update({name: AWS_CLUSTER.name for name in docker_env(cluster.get("worker_run_options", []))})
    used.update({name: JOB_TEMPLATE.name
                 for name in job_template()["variables"]["properties"]["env"].get("default", {})})
    stack = load_stack_module()
    used.update({name: "infra/local/stack.py env.sh" for name in stack.client_env(
        {"s3": 1, "mlflow": 2, "prefect": 3, "ray": 4},
        {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})})
    unknown = {name: where for name, where in used.items() if name not in ENV_NAMES}
    assert not unknown, f"variables missing from infra/contract.yaml: {unknown}"


def test_secrets_come_only_from_kubernetes_secrets() -> None:
    declared = CONTRACT["k8s_secrets"]
    assert {key for keys in declared.values() for key in keys} <= SECRET_ENV
    for path, doc in k8s_docs():
        assert doc["kind"] != "Secret", f"{path.name}: Secrets are created by hand, never committed"
        for container in containers(doc):
            for entry in container.get("env", []):
                if entry["name"] in SECRET_ENV:
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in entry, f"{path.name}: {entry['name']} not from a Secret"
                    assert ref["key"] in declared[ref["name"]], f"{path.name}: {ref}"
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in declared, f"{path.name}: {source}"
    for source in job_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
            "containers"][0]["envFrom"]:
        if "secretRef" in source:
            assert source["secretRef"]["name"] in declared
    assert not SECRET_ENV & set(docker_env(aws_cluster()["docker"]["run_options"]))


LITERAL_SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URI": re.compile(r"\b[a-z+]+://[^/\s:@]+:(?!PASSWORD@)[^@\s/]+@"),
    "Ray token": re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9]{16,}"),
}


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_secrets(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for what, pattern in LITERAL_SECRET_PATTERNS.items():
        assert not pattern.search(text), f"{path.relative_to(ROOT)} holds what looks like a {what}"


# --- Ray: versions, ports, GPUs, entrypoint ----------------------------------------------
def test_ray_version_matches_the_lock_everywhere() -> None:
    import ray

    assert ray.__version__ == CONTRACT["ray_version"]
    for doc in ray_docs():
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == CONTRACT["ray_version"], doc["metadata"]["name"]


def test_ray_heads_expose_the_contract_ports() -> None:
    for doc in ray_docs():
        head, _ = pod_specs_of_ray(doc)
        ports = {p["name"]: p["containerPort"] for c in containers(head) for p in c.get("ports", [])}
        assert ports["gcs-server"] == CONTRACT["ray_gcs_port"]
        assert ports["dashboard"] == CONTRACT["ray_dashboard_port"]
        assert head["rayStartParams"]["num-cpus"] == "0", "the head does not train"
        assert "nvidia.com/gpu" not in json.dumps(head)
    cluster = aws_cluster()
    head_cmd = " ".join(cluster["head_start_ray_commands"])
    worker_cmd = " ".join(cluster["worker_start_ray_commands"])
    assert f"--port={CONTRACT['ray_gcs_port']}" in head_cmd
    assert f"--dashboard-port={CONTRACT['ray_dashboard_port']}" in head_cmd
    assert f"--address=$RAY_HEAD_IP:{CONTRACT['ray_gcs_port']}" in worker_cmd
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmd
    manager_ports = {re.search(r"--object-manager-port=(\d+)", c).group(1) for c in (head_cmd, worker_cmd)}
    assert len(manager_ports) == 1


def test_gpu_worker_groups_request_gpus() -> None:
    for doc in ray_docs():
        _, groups = pod_specs_of_ray(doc)
        assert groups
        for group in groups:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            for container in containers(group):
                limits, requests = container["resources"]["limits"], container["resources"]["requests"]
                where = f"{doc['metadata']['name']}/{group['groupName']}"
                assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{where}: no GPU limit"
                assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/dev/shm" in mounts, "NCCL needs a larger /dev/shm"
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    cluster = aws_cluster()
    workers = {name: t for name, t in cluster["available_node_types"].items()
               if name != cluster["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert re.match(r"(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.", node_type["node_config"]["InstanceType"]), name
        assert node_type["min_workers"] <= node_type["max_workers"] <= cluster["max_workers"]
    assert "--gpus all" in cluster["docker"]["worker_run_options"]
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"] == {"CPU": 0}


def test_aws_cluster_config_passes_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws_cluster()))


def train_cli_options() -> set[str]:
    import typer.main

    from gara.cli import app

    command = typer.main.get_command(app).commands["train"]
    return {opt for param in command.params for opt in param.opts}


def check_train_command(command: str, where: str) -> dict[str, Any]:
    """The command is the contract's train command, every flag exists and every override loads."""
    from gara.config import load_params

    tokens = shlex.split(command)
    prefix = shlex.split(CONTRACT["train_command"])
    assert tokens[: len(prefix)] == prefix, f"{where}: {command!r}"
    options = train_cli_options()
    overrides: dict[str, Any] = {}
    values: dict[str, str] = {}
    rest = tokens[len(prefix):]
    for flag, value in zip(rest[::2], rest[1::2], strict=True):
        assert flag in options, f"{where}: `gara train` has no option {flag}"
        if flag == "--set":
            key, _, raw = value.partition("=")
            overrides[key] = yaml.safe_load(raw)
        else:
            values[flag] = value
    assert values["--params"].startswith(CONTRACT["workdir"] + "/"), "params.yaml ships in the image workdir"
    params = load_params(ROOT / "params.yaml", overrides)  # refuses unknown keys and bad values
    return {"params": params, "values": values, "overrides": overrides}


def test_rayjob_entrypoint_is_a_valid_gara_train_command() -> None:
    for job in by_kind("RayJob"):
        checked = check_train_command(job["spec"]["entrypoint"], job["metadata"]["name"])
        train = checked["params"].train
        assert train.use_gpu and train.ray_address == "auto"
        _, groups = pod_specs_of_ray(job)
        gpus = sum(g["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
                   for g in groups for c in containers(g))
        workers = int(checked["values"].get("--workers", train.num_workers))
        assert workers <= gpus, f"{workers} Ray Train workers but only {gpus} GPUs"
        shared = {m["mountPath"] for c in containers(job) for m in c.get("volumeMounts", [])}
        for path in (train.data, train.val_data, checked["values"]["--out"]):
            assert any(path.startswith(m + "/") for m in shared), f"{path}: not on a volume all nodes mount"


def test_train_module_and_command_exist() -> None:
    assert importlib.util.find_spec(CONTRACT["train_command"].split()[2]) is not None
    assert {"--params", "--set", "--workers", "--out"} <= train_cli_options()


# --- Prefect ------------------------------------------------------------------------------
def test_flow_entrypoint_exists() -> None:
    path, _, func = CONTRACT["flow_entrypoint"].partition(":")
    assert re.fullmatch(r"pipelines/[\w/]+\.py", path) and func == CONTRACT["flow_name"]
    assert CONTRACT["deployment"].split("/")[0] == CONTRACT["flow_name"]
    source = ROOT / path
    if not source.exists():
        pytest.skip(f"{path} is not written yet: only the entrypoint's form is checked")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    flows = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == func
             and any("flow" in ast.unparse(d) for d in node.decorator_list)]
    assert flows, f"{CONTRACT['flow_entrypoint']}: no @flow function {func}"


def test_prefect_yaml_deploys_the_contract_flow_to_the_pool() -> None:
    path = ROOT / "prefect.yaml"
    if not path.exists():
        pytest.skip("prefect.yaml is not written yet")
    deployments = yaml.safe_load(path.read_text(encoding="utf-8")).get("deployments", [])
    name = CONTRACT["deployment"].split("/")[1]
    matching = [d for d in deployments if d.get("name") == name]
    assert matching, f"prefect.yaml has no deployment {name}"
    deployment = matching[0]
    assert deployment["entrypoint"] == CONTRACT["flow_entrypoint"]
    assert deployment["work_pool"]["name"] == CONTRACT["work_pool"]
    schedules = deployment.get("schedules") or [deployment.get("schedule") or {}]
    assert any(s.get("cron") for s in schedules), "the nightly deployment needs a cron schedule"


def test_work_pool_template_and_worker_agree() -> None:
    from prefect.server.schemas.actions import WorkPoolCreate

    template = job_template()
    # The server's own check at `prefect work-pool create`: placeholders must be variables.
    WorkPoolCreate(name=CONTRACT["work_pool"], type="kubernetes", base_job_template=template)
    variables = template["variables"]["properties"]
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), f"undefined template variables: {placeholders - set(variables)}"
    assert variables["namespace"]["default"] == "gara"
    service_accounts = {doc["metadata"]["name"] for doc in by_kind("ServiceAccount")}
    assert variables["service_account_name"]["default"] in service_accounts
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims <= {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")}
    # Flow runs reach the long-running RayCluster through its head Service's client port.
    cluster = by_kind("RayCluster")[0]
    head, _ = pod_specs_of_ray(cluster)
    client_port = {p["name"]: p["containerPort"] for c in containers(head) for p in c["ports"]}["client"]
    expected = f"ray://{cluster['metadata']['name']}-head-svc.{cluster['metadata']['namespace']}" \
               f".svc.cluster.local:{client_port}"
    assert variables["env"]["default"]["RAY_ADDRESS"] == expected

    worker = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "prefect-worker")
    command = containers(worker)[0]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == CONTRACT["work_pool"]
    assert command[command.index("--type") + 1] == "kubernetes"
    role = next(d for d in by_kind("Role") if d["metadata"]["name"] == "prefect-worker")
    assert any("jobs" in rule["resources"] and "create" in rule["verbs"] for rule in role["rules"])


# --- MLflow and the shared ConfigMap -------------------------------------------------------
def test_mlflow_server_deployment_uses_s3_artifacts_and_a_secret_store() -> None:
    deployment = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    container = containers(deployment)[0]
    assert container["command"][:2] == ["mlflow", "server"]
    assert f"--port={CONTRACT['mlflow_port']}" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "gara-mlflow-db"
    service = next(d for d in by_kind("Service") if d["metadata"]["name"] == "mlflow")
    assert service["spec"]["ports"][0]["port"] == CONTRACT["mlflow_port"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_config_map_points_at_the_services() -> None:
    config = by_kind("ConfigMap")[0]["data"]
    ns = by_kind("Namespace")[0]["metadata"]["name"]
    assert config["MLFLOW_TRACKING_URI"] == f"http://mlflow.{ns}.svc.cluster.local:{CONTRACT['mlflow_port']}"
    assert config["PREFECT_API_URL"].endswith(f".{ns}.svc.cluster.local:{CONTRACT['prefect_port']}/api")
    assert config["RAY_AUTH_MODE"] == "token"
    for _, doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == ns, doc["metadata"]["name"]


# --- local stack, Makefile, docs -----------------------------------------------------------
def test_local_stack_defaults_follow_the_contract() -> None:
    stack = load_stack_module()
    assert stack.default_ports(CONTRACT) == {
        "s3": CONTRACT["s3_port"], "mlflow": CONTRACT["mlflow_port"],
        "prefect": CONTRACT["prefect_port"], "ray": CONTRACT["ray_gcs_port"]}
    assert stack.default_ports(CONTRACT)["s3"] != 5000, "moto's default port clashes with MLflow's"


def test_makefile_and_gitignore_know_the_stack() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^stack-up:.*\n\t.*infra/local/stack\.py up", makefile, re.M)
    assert re.search(r"^stack-down:.*\n\t.*infra/local/stack\.py down", makefile, re.M)
    assert ".stack/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_infra_readme_covers_every_file_and_secret() -> None:
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    for path in text_files() + sorted(INFRA.rglob("*.lock")):
        if path.name != "README.md":
            assert str(path.relative_to(INFRA)) in readme, f"infra/README.md does not mention {path.name}"
    for name, keys in CONTRACT["k8s_secrets"].items():
        assert f"kubectl -n gara create secret generic {name}" in readme
        for key in keys:
            assert f"--from-literal={key}=" in readme or f"--from-file={key}=" in readme
    assert "## Local stack" in (ROOT / "README.md").read_text(encoding="utf-8")
