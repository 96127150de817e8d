"""Checks of the deployment files in deploy/: no Prefect server, cluster or Docker.

* deploy/prefect.yaml: parses, is accepted by Prefect's own prefect.yaml
  model, each deployment has a name, entrypoint and work pool, the entrypoints
  are the specified ones and (once the flow files exist) name real flows whose
  parameters cover the ones the deployments set, and the cron schedule is valid.
* deploy/work-pools/*.json: parse, every ``{{ placeholder }}`` of a
  job_configuration is a declared variable, variable defaults and each
  deployment's job_variables satisfy the variables schema, and the Kubernetes
  template, rendered the way a Prefect worker renders it, asks for
  ``nvidia.com/gpu``, GPU nodes and a RAM-backed /dev/shm.
* deploy/Dockerfile: CUDA runtime base with Python 3.12, installs ``.[gpu]``
  and never faiss-cpu nor the dev/cpu extras, its faiss guard really fails
  when faiss-cpu is present, and its user, workdir and command agree with the
  templates and prefect.yaml.

Prefect is imported only inside the tests that need it (it is slow to import).
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
import shlex
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PREFECT_YAML = DEPLOY / "prefect.yaml"
K8S_TEMPLATE = DEPLOY / "work-pools" / "kubernetes-gpu.json"
PROCESS_TEMPLATE = DEPLOY / "work-pools" / "process.json"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"

# The flows' specified entrypoints, per deployment.
EXPECTED_ENTRYPOINTS = {
    "scheduled-generate": "flows/generate.py:generate",
    "factory": "flows/factory.py:factory",
}
EXPECTED_POOLS = {"scheduled-generate": "gpu-k8s", "factory": "local-process"}
# Optional variants: checked like the others when present in prefect.yaml.
OPTIONAL_ENTRYPOINTS = {"factory-dask": "flows/factory.py:factory"}
OPTIONAL_POOLS = {"factory-dask": "local-process"}
ALL_ENTRYPOINTS = EXPECTED_ENTRYPOINTS | OPTIONAL_ENTRYPOINTS
ALL_POOLS = EXPECTED_POOLS | OPTIONAL_POOLS
APP_DIR = "/opt/labelfoundry"

# Prefect's placeholder syntax (prefect.utilities.templating.PLACEHOLDER_CAPTURE_REGEX).
PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")

# Keys of a Kubernetes work pool's job_configuration (Prefect's documented format).
K8S_JOB_CONFIGURATION_KEYS = {
    "command",
    "env",
    "labels",
    "name",
    "namespace",
    "job_manifest",
    "cluster_config",
    "job_watch_timeout_seconds",
    "pod_watch_timeout_seconds",
    "stream_output",
}


# --------------------------------------------------------------------------
# loading helpers
# --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _prefect_yaml_text() -> str:
    return PREFECT_YAML.read_text()


def load_prefect_yaml() -> dict[str, Any]:
    data = yaml.safe_load(_prefect_yaml_text())
    assert isinstance(data, dict), "deploy/prefect.yaml must be a YAML mapping"
    return data


def deployments() -> list[dict[str, Any]]:
    deps = load_prefect_yaml().get("deployments")
    assert isinstance(deps, list) and deps, "prefect.yaml has no deployments"
    return deps


def deployment(name: str) -> dict[str, Any]:
    matches = [d for d in deployments() if d.get("name") == name]
    if not matches and name in OPTIONAL_ENTRYPOINTS:
        pytest.skip(f"optional deployment {name!r} is not in prefect.yaml")
    assert len(matches) == 1, f"expected exactly one deployment named {name!r}, found {len(matches)}"
    return matches[0]


def load_template(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def template_for_pool(pool: str) -> dict[str, Any]:
    return {"gpu-k8s": load_template(K8S_TEMPLATE), "local-process": load_template(PROCESS_TEMPLATE)}[pool]


def placeholders(obj: Any) -> set[str]:
    return set(PLACEHOLDER.findall(json.dumps(obj)))


def referenced_parameters(dep: dict[str, Any]) -> set[str]:
    """Flow parameters a deployment sets: its parameters and its schedules' parameters."""
    names = set((dep.get("parameters") or {}).keys())
    for schedule in dep.get("schedules") or []:
        names |= set((schedule.get("parameters") or {}).keys())
    return names


def render_job_configuration(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """Render a base job template the way prefect.workers.base.BaseJobConfiguration
    .from_template_and_values does (minus block/variable references, which these
    templates do not use)."""
    from prefect.utilities.templating import apply_values

    config = copy.deepcopy(template["job_configuration"])
    values = {
        name: spec["default"]
        for name, spec in template["variables"].get("properties", {}).items()
        if spec.get("default") is not None
    }
    if values.get("env"):
        config["env"] = config["env"] | values["env"] if isinstance(config.get("env"), dict) else values["env"]
    values.update(copy.deepcopy(job_variables))
    if isinstance(config.get("env"), dict) and values.get("env"):
        config["env"] = config["env"] | values["env"]
    return apply_values(template=config, values=values)


# --------------------------------------------------------------------------
# Dockerfile parsing
# --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may also sit between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def dockerfile_arg_defaults() -> dict[str, str]:
    defaults: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults.setdefault(name.strip(), value.strip().strip('"'))
    return defaults


def substitute_args(text: str) -> str:
    defaults = dockerfile_arg_defaults()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}


def shell_commands(run_args: str) -> list[list[str]]:
    """A RUN line's simple commands, as token lists (quote-aware, split at && || ; |)."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SHELL_SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_install_tokens(run_args: str) -> list[list[str]]:
    """Argument lists of every `pip install` / `python -m pip install` / `uv pip install`."""
    found = []
    for tokens in shell_commands(run_args):
        for i, token in enumerate(tokens[:-1]):
            if token.rsplit("/", 1)[-1] in ("pip", "pip3", "pip3.12") and tokens[i + 1] == "install":
                found.append(tokens[i + 2 :])
                break
    return found


def faiss_guard_code() -> str:
    """The Python code of the Dockerfile's faiss check (`python -c "..."`)."""
    for keyword, args in dockerfile_instructions():
        if keyword != "RUN" or "importlib.metadata" not in args:
            continue
        for tokens in shell_commands(args):
            if "-c" in tokens and "importlib.metadata" in tokens[tokens.index("-c") + 1]:
                return tokens[tokens.index("-c") + 1]
    raise AssertionError("Dockerfile has no `RUN python -c \"import importlib.metadata ...\"` faiss check")


# --------------------------------------------------------------------------
# prefect.yaml
# --------------------------------------------------------------------------


def test_prefect_yaml_top_level():
    config = load_prefect_yaml()
    assert config.get("name") == "labelfoundry"
    assert str(config.get("prefect-version", "")).startswith("3."), "prefect-version must be a Prefect 3 version"
    assert "build" in config and config["build"] is None
    assert "push" in config and config["push"] is None


def test_pull_step_sets_working_directory_to_the_image_workdir():
    pull = load_prefect_yaml().get("pull")
    assert isinstance(pull, list) and pull, "prefect.yaml needs a pull section"
    steps = [step for step in pull if "prefect.deployments.steps.set_working_directory" in step]
    assert len(steps) == 1, "expected one prefect.deployments.steps.set_working_directory pull step"
    assert steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == APP_DIR


def test_every_deployment_has_name_entrypoint_and_work_pool():
    names = []
    for dep in deployments():
        assert isinstance(dep.get("name"), str) and dep["name"], dep
        names.append(dep["name"])
        entrypoint = dep.get("entrypoint")
        assert isinstance(entrypoint, str) and re.fullmatch(r"[\w./-]+\.py:\w+", entrypoint), (
            f"{dep['name']}: entrypoint must look like path/to/file.py:function, got {entrypoint!r}"
        )
        pool = dep.get("work_pool")
        assert isinstance(pool, dict) and pool.get("name"), f"{dep['name']}: work_pool.name missing"
        assert isinstance(pool.get("job_variables", {}), dict)
        assert dep.get("description"), f"{dep['name']}: description missing"
        assert isinstance(dep.get("tags"), list) and dep["tags"], f"{dep['name']}: tags missing"
    assert len(names) == len(set(names)), f"duplicate deployment names: {names}"
    assert set(EXPECTED_ENTRYPOINTS) <= set(names)


@pytest.mark.parametrize("name", sorted(ALL_ENTRYPOINTS))
def test_entrypoint_and_pool_are_the_specified_ones(name):
    dep = deployment(name)
    assert dep["entrypoint"] == ALL_ENTRYPOINTS[name]
    assert dep["work_pool"]["name"] == ALL_POOLS[name]


def test_no_unexpected_deployments():
    unexpected = {d["name"] for d in deployments()} - set(ALL_ENTRYPOINTS)
    assert not unexpected, f"add {sorted(unexpected)} to ALL_ENTRYPOINTS/ALL_POOLS so that they are checked"


def test_scheduled_generate_parameters_and_gpu_job_variables():
    dep = deployment("scheduled-generate")
    assert dep["parameters"] == {"config": "configs/production.yaml", "num_samples": 100000}
    job_variables = dep["work_pool"]["job_variables"]
    assert isinstance(job_variables.get("image"), str) and job_variables["image"].strip()
    assert isinstance(job_variables.get("gpu_count"), int) and job_variables["gpu_count"] >= 1


@pytest.mark.parametrize("name", ["factory", *sorted(OPTIONAL_ENTRYPOINTS)])
def test_factory_deployments_are_on_demand(name):
    dep = deployment(name)
    assert not dep.get("schedules") and not dep.get("schedule"), f"{name} is on-demand: no schedules"


def test_factory_dask_selects_the_dask_runner():
    overrides = deployment("factory-dask")["parameters"]["overrides"]
    assert overrides["runner"]["kind"] == "dask"


@pytest.mark.parametrize("name", sorted(ALL_ENTRYPOINTS))
def test_parameters_validate_as_a_run_config(name):
    """`overrides` (and num_samples, which the generate flow turns into one) must
    make a valid RunConfig, or the run fails at its first line."""
    dep = deployment(name)
    config_module = pytest.importorskip("labelfoundry.config")
    params = dep.get("parameters") or {}
    overrides = dict(params.get("overrides") or {})
    if params.get("num_samples") is not None:
        overrides["generate"] = {**overrides.get("generate", {}), "num_samples": params["num_samples"]}
    config_module.load_config(None, overrides)


def test_prefect_accepts_prefect_yaml():
    """`prefect deploy` only warns and skips a prefect.yaml its model rejects."""
    models = pytest.importorskip("prefect.cli.deploy._models")
    model = models.PrefectYamlModel.model_validate(load_prefect_yaml())
    assert [d.name for d in model.deployments] == [d["name"] for d in deployments()]
    for dep in model.deployments:
        assert dep.entrypoint and dep.work_pool and dep.work_pool.name


def _cron_is_valid(expression: str, timezone: str | None) -> bool:
    try:
        from croniter import croniter  # type: ignore[import-not-found]
    except ImportError:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=expression, timezone=timezone)
        except ValueError:
            return False
        return True
    return croniter.is_valid(expression)


def test_cron_checker_rejects_bad_expressions():
    assert _cron_is_valid("0 2 * * *", "UTC")
    assert not _cron_is_valid("61 2 * * *", "UTC")
    assert not _cron_is_valid("0 2 * *", "UTC")


def test_schedules_are_valid_cron():
    dep = deployment("scheduled-generate")
    schedules = dep.get("schedules")
    assert isinstance(schedules, list) and len(schedules) >= 1, "scheduled-generate needs a schedule"
    for schedule in schedules:
        cron = schedule.get("cron")
        assert isinstance(cron, str) and len(cron.split()) == 5, f"expected a 5-field cron, got {cron!r}"
        assert schedule.get("timezone") == "UTC"
        assert schedule.get("active", True) is True
        assert _cron_is_valid(cron, schedule["timezone"]), f"invalid cron {cron!r}"
    # every schedule of every deployment, not only the nightly one
    for other in deployments():
        for schedule in other.get("schedules") or []:
            if "cron" in schedule:
                assert _cron_is_valid(schedule["cron"], schedule.get("timezone")), (other["name"], schedule)


def test_prefect_yaml_mentions_the_gpu_concurrency_limit():
    text = _prefect_yaml_text()
    assert re.search(r"prefect concurrency-limit create gpu \d+", text)
    assert "prefect work-pool set-concurrency-limit gpu-k8s" in text


# --------------------------------------------------------------------------
# entrypoints -> real flows
# --------------------------------------------------------------------------


def _module_level_definition(tree: ast.Module, name: str) -> ast.AST | None:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return node
    return None


def _check_parameters(name: str, params: dict[str, inspect.Parameter], dep: dict[str, Any]) -> None:
    kinds = {p.kind for p in params.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        missing = referenced_parameters(dep) - set(params)
        assert not missing, f"{dep['entrypoint']} has no parameter(s) {sorted(missing)} set by deployment {name!r}"
    required = {
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    unset = required - set((dep.get("parameters") or {}).keys())
    assert not unset, (
        f"deployment {name!r} must set the required parameter(s) {sorted(unset)} of {dep['entrypoint']}: "
        "scheduled and one-click runs have nobody to pass them"
    )


def _ast_parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, inspect.Parameter]:
    a = node.args
    positional = a.posonlyargs + a.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = {
        arg.arg: inspect.Parameter(arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
        for arg, d in zip(positional, defaults)
    }
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        params[arg.arg] = inspect.Parameter(
            arg.arg, inspect.Parameter.KEYWORD_ONLY, default=inspect.Parameter.empty if d is None else d
        )
    if a.vararg:
        params[a.vararg.arg] = inspect.Parameter(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL)
    if a.kwarg:
        params[a.kwarg.arg] = inspect.Parameter(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD)
    return params


@pytest.mark.parametrize("name", sorted(ALL_ENTRYPOINTS))
def test_entrypoint_names_a_real_flow(name, monkeypatch):
    dep = deployment(name)
    path, func = dep["entrypoint"].split(":")
    file = ROOT / path
    if not file.exists():
        pytest.skip(f"{path} is not written yet; the entrypoint string itself is checked elsewhere")

    # Without importing: the function (or a name bound to the flow) is defined at module level.
    tree = ast.parse(file.read_text(), filename=str(file))
    node = _module_level_definition(tree, func)
    assert node is not None, f"{path} exists but defines no module-level {func!r}"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        _check_parameters(name, _ast_parameters(node), dep)

    # Importing, the way a worker loads it: relative to the project root.
    from prefect import Flow
    from prefect.exceptions import MissingFlowError, ScriptError
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    try:
        flow = load_flow_from_entrypoint(dep["entrypoint"], use_placeholder_flow=False)
    except ScriptError as exc:
        if isinstance(exc.user_exc, ImportError):
            pytest.skip(f"{path} is not importable here: {exc.user_exc!r}")
        raise
    except MissingFlowError as exc:
        pytest.fail(f"{dep['entrypoint']}: {exc}")
    assert isinstance(flow, Flow), f"{dep['entrypoint']} is not a Prefect flow"
    _check_parameters(name, dict(inspect.signature(flow.fn).parameters), dep)

    # The deployment's parameter values satisfy the flow's parameter schema
    # (`prefect deploy` enforces it).
    import jsonschema

    schema = flow.parameters.model_dump_for_openapi()
    jsonschema.validate(dep.get("parameters") or {}, schema)


def test_production_config_is_in_the_repository():
    config = deployment("scheduled-generate")["parameters"]["config"]
    assert not Path(config).is_absolute(), "config is resolved against the pull step's working directory"
    if not (ROOT / config).exists():
        pytest.skip(f"{config} is not written yet (the image copies it to {APP_DIR}/{config})")


# --------------------------------------------------------------------------
# work pool templates
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [K8S_TEMPLATE, PROCESS_TEMPLATE], ids=lambda p: p.name)
def test_template_parses_and_every_placeholder_is_a_declared_variable(path):
    template = load_template(path)
    assert set(template) == {"job_configuration", "variables"}
    variables = template["variables"]
    assert variables.get("type") == "object" and isinstance(variables.get("properties"), dict)
    used = placeholders(template["job_configuration"])
    declared = set(variables["properties"])
    assert used, "job_configuration has no placeholders"
    assert used <= declared, f"undeclared variables in job_configuration: {sorted(used - declared)}"
    # A declared variable that no placeholder uses would silently do nothing.
    assert declared <= used, f"variables never used in job_configuration: {sorted(declared - used)}"


@pytest.mark.parametrize("path", [K8S_TEMPLATE, PROCESS_TEMPLATE], ids=lambda p: p.name)
def test_prefect_server_accepts_template(path):
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(load_template(path))


def test_placeholder_check_catches_an_undeclared_variable():
    template = load_template(K8S_TEMPLATE)
    template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = (
        "{{ priority_class }}"
    )
    assert "priority_class" in placeholders(template["job_configuration"]) - set(template["variables"]["properties"])
    from prefect.server.schemas.actions import validate_base_job_template

    with pytest.raises(ValueError, match="priority_class"):
        validate_base_job_template(template)


@pytest.mark.parametrize("path", [K8S_TEMPLATE, PROCESS_TEMPLATE], ids=lambda p: p.name)
def test_variable_defaults_satisfy_their_schema(path):
    import jsonschema

    variables = load_template(path)["variables"]
    validator_cls = jsonschema.validators.validator_for(variables)
    validator_cls.check_schema(variables)
    for name, spec in variables["properties"].items():
        if "default" in spec:
            sub = {**spec, "definitions": variables.get("definitions", {})}
            errors = [e.message for e in validator_cls(sub).iter_errors(spec["default"])]
            assert not errors, f"default of {name!r} violates its schema: {errors}"


@pytest.mark.parametrize("name", sorted(ALL_POOLS))
def test_deployment_job_variables_satisfy_the_pool_schema(name):
    """What the Prefect server checks when a deployment is created and run."""
    import jsonschema

    dep = deployment(name)
    variables = template_for_pool(dep["work_pool"]["name"])["variables"]
    job_variables = dep["work_pool"].get("job_variables") or {}
    unknown = set(job_variables) - set(variables["properties"])
    assert not unknown, f"{name}: job_variables not defined by the pool template: {sorted(unknown)}"
    jsonschema.validate(job_variables, variables)


def test_process_template_matches_prefects_default_shape():
    from prefect.workers.process import ProcessWorker

    default = ProcessWorker.get_default_base_job_template()
    template = load_template(PROCESS_TEMPLATE)
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])


def test_k8s_job_configuration_has_the_documented_keys():
    config = load_template(K8S_TEMPLATE)["job_configuration"]
    missing = K8S_JOB_CONFIGURATION_KEYS - set(config)
    assert not missing, f"kubernetes job_configuration lacks {sorted(missing)}"


def _k8s_pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def test_k8s_manifest_has_what_the_kubernetes_worker_requires():
    """prefect-kubernetes rejects manifests that differ from these values."""
    manifest = load_template(K8S_TEMPLATE)["job_configuration"]["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = _k8s_pod_spec(manifest)
    assert pod["restartPolicy"] == "Never"
    assert pod["parallelism"] == 1 and pod["completions"] == 1
    assert pod["containers"][0]["name"] == "prefect-job"
    assert pod["containers"][0]["image"] == "{{ image }}"
    assert pod["containers"][0]["args"] == "{{ command }}"
    assert pod["containers"][0]["env"] == "{{ env }}"


def test_k8s_template_requests_gpus():
    template = load_template(K8S_TEMPLATE)
    container = _k8s_pod_spec(template["job_configuration"]["job_manifest"])["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    gpu_count = template["variables"]["properties"]["gpu_count"]
    assert gpu_count["type"] == "integer" and gpu_count["default"] == 1 and gpu_count.get("minimum", 0) >= 1
    for key in ("cpu", "memory"):
        assert key in container["resources"]["limits"] and key in container["resources"]["requests"]


def test_k8s_template_passes_prefect_api_url_from_a_variable():
    template = load_template(K8S_TEMPLATE)
    env = template["job_configuration"]["env"]
    assert isinstance(env, dict) and placeholders(env.get("PREFECT_API_URL")) == {"prefect_api_url"}
    rendered = render_job_configuration(template, {"image": "x", "prefect_api_url": "http://api:4200/api"})
    assert rendered["env"]["PREFECT_API_URL"] == "http://api:4200/api"
    # unset: dropped, so the worker's own PREFECT_API_URL is passed through
    assert "PREFECT_API_URL" not in render_job_configuration(template, {"image": "x"})["env"]


@pytest.mark.parametrize("name", [n for n, pool in ALL_POOLS.items() if pool == "gpu-k8s"])
def test_rendered_gpu_job_manifest(name):
    dep = deployment(name)
    job_variables = dep["work_pool"]["job_variables"]
    rendered = render_job_configuration(load_template(K8S_TEMPLATE), job_variables)
    manifest = rendered["job_manifest"]
    assert "{{" not in json.dumps(manifest), "unrendered placeholder left in the job manifest"
    pod = _k8s_pod_spec(manifest)
    container = pod["containers"][0]

    assert container["image"] == job_variables["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == job_variables["gpu_count"]
    assert manifest["spec"]["backoffLimit"] == 0

    # GPU nodes: a node selector and a toleration for the nvidia.com/gpu taint
    assert pod["nodeSelector"], "no nodeSelector for GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])

    # shared memory for DataLoader workers: a RAM-backed emptyDir at /dev/shm
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]

    # run directories (caches reused by later runs, shards) outlive the pod
    runs = volumes[mounts[f"{APP_DIR}/runs"]]
    assert runs["persistentVolumeClaim"]["claimName"]

    # non-root, as the image's USER
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user().split(":")[0]


def test_rendered_manifest_is_accepted_by_the_kubernetes_worker():
    """Only where prefect-kubernetes is installed (it is not a project dependency)."""
    worker = pytest.importorskip("prefect_kubernetes.worker")
    import uuid

    from prefect.client.schemas.objects import FlowRun

    job_variables = deployment("scheduled-generate")["work_pool"]["job_variables"]
    config = worker.KubernetesWorkerJobConfiguration(
        **render_job_configuration(load_template(K8S_TEMPLATE), job_variables)
    )
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="test-run", flow_id=uuid.uuid4()))
    container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == job_variables["gpu_count"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert isinstance(container["env"], list)


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def dockerfile_user() -> str:
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "Dockerfile sets no USER"
    return substitute_args(users[-1])


def test_dockerfile_base_is_a_cuda_12_runtime_on_ubuntu_with_python_312():
    froms = [substitute_args(args) for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert froms
    image = froms[0].split()[0]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d\d\.\d\d", image), image
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert "python3.12" in runs


def test_dockerfile_installs_the_gpu_extra_and_never_faiss_cpu():
    installs = [
        tokens for keyword, args in dockerfile_instructions() if keyword == "RUN" for tokens in pip_install_tokens(args)
    ]
    assert installs, "Dockerfile has no pip install"
    all_tokens = [token for tokens in installs for token in tokens]
    assert ".[gpu]" in all_tokens, f"the project must be installed as .[gpu]; pip installs: {installs}"
    for token in all_tokens:
        lowered = token.lower()
        assert not re.search(r"faiss[-_.]?cpu", lowered), f"installs faiss-cpu: {token!r}"
        extras = re.search(r"\[([^\]]*)\]", lowered)
        if extras:
            names = {e.strip() for e in extras.group(1).split(",")}
            assert not names & {"dev", "cpu"}, f"installs the dev/cpu extra (both pull faiss-cpu): {token!r}"


def test_pip_install_parser_sees_forbidden_installs():
    assert pip_install_tokens('pip install ".[gpu]" faiss-cpu') == [[".[gpu]", "faiss-cpu"]]
    assert pip_install_tokens("apt-get update && python -m pip install -e '.[dev]'") == [["-e", ".[dev]"]]
    assert pip_install_tokens("echo pip") == []
    assert pip_install_tokens("python -c 'import a; print(1)' && pip install x") == [["x"]]


def test_pyproject_gpu_extra_has_no_faiss_cpu():
    """`.[gpu]` is only faiss-cpu-free if neither the extra nor the base dependencies pull it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("faiss-gpu-cu12") for r in extras["gpu"])
    for requirement in project["dependencies"] + extras["gpu"]:
        assert not re.match(r"faiss[-_]?cpu", requirement.lower()), requirement


def test_dockerfile_faiss_guard_runs_after_the_install():
    instructions = dockerfile_instructions()
    install_at = next(
        i
        for i, (k, a) in enumerate(instructions)
        if k == "RUN" and any(".[gpu]" in t for t in pip_install_tokens(a))
    )
    guard_at = next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and "importlib.metadata" in a)
    assert guard_at > install_at
    # same build stage
    assert not any(k == "FROM" for k, _ in instructions[install_at:guard_at])


def _run_guard(tmp_path: Path, dists: list[str]) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    for dist in dists:
        info = site / f"{dist.replace('-', '_')}-1.0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0.0\n")
    prelude = f"import sys; sys.path.append({str(site)!r})\n"
    return subprocess.run(
        [sys.executable, "-S", "-E", "-c", prelude + faiss_guard_code()],
        cwd=site,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dockerfile_faiss_guard_passes_with_faiss_gpu_only(tmp_path):
    result = _run_guard(tmp_path, ["faiss-gpu-cu12", "numpy"])
    assert result.returncode == 0, result.stderr


def test_dockerfile_faiss_guard_fails_with_faiss_cpu(tmp_path):
    result = _run_guard(tmp_path, ["faiss-gpu-cu12", "faiss-cpu"])
    assert result.returncode != 0
    assert "faiss-cpu" in result.stderr


def test_dockerfile_faiss_guard_fails_without_faiss_gpu(tmp_path):
    result = _run_guard(tmp_path, ["numpy"])
    assert result.returncode != 0


def test_dockerfile_runtime_settings_agree_with_the_deployment():
    instructions = dockerfile_instructions()
    workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
    assert workdirs and workdirs[-1] == APP_DIR

    envs = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert re.search(r"\bPREFECT_HOME=\S+", envs), "PREFECT_HOME not set"

    user = dockerfile_user()
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, got {user!r}"

    cmds = [args for keyword, args in instructions if keyword == "CMD"]
    assert cmds, "no CMD"
    cmd = json.loads(cmds[-1])  # exec form
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == deployment("scheduled-generate")["work_pool"]["name"]

    # The Kubernetes worker replaces CMD with `prefect flow-run execute`; an
    # ENTRYPOINT would prefix it, so it may only be an init like tini.
    for keyword, args in instructions:
        if keyword == "ENTRYPOINT":
            assert "prefect" not in args and "python" not in args, args


def test_dockerignore_keeps_local_state_out_of_the_image():
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = {line.rstrip("/") for line in lines if line and not line.startswith("#")}
    for required in (".git", ".venv", "runs", "scratch"):
        assert required in patterns, f"{required} is not excluded from the build context"
    for needed in ("pyproject.toml", "labelfoundry", "flows", "configs"):
        assert needed not in patterns, f"{needed} must stay in the build context"
