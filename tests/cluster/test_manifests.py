"""The cluster files (launcher, KubeRay RayJob/RayService, runtime env, Dockerfile) against the code.

Each file is loaded and the parts we rely on are checked with the real validators where Ray has one
(the launcher's JSON schema, RuntimeEnv, Serve's deploy schema, our own SweepConfig/ServeConfig), so a
renamed config key, a moved builder, a CLI change or a Ray upgrade breaks a test instead of a deploy.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHARED_MOUNT = "/mnt/duetto"
YAMLS = ["launcher.yaml", "runtime_env.yaml", "kuberay/rayjob-sweep.yaml", "kuberay/rayservice-ensemble.yaml",
         "kuberay/shared-volume.yaml"]  # fmt: skip


def _ray_version() -> str:
    import ray

    return ray.__version__


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _first_command(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path}: the first line must be a comment giving the command that uses it"
    return first[2:].split("   ")[0].strip()


def _check_sweep_command(argv: list[str]) -> None:
    """`duetto sweep run CONFIG key=value...`: the parser accepts it, a shipped config, overrides the sweep accepts."""
    from duetto.cli import parse_args
    from duetto.tune.spec import load_sweep

    assert argv[0] == "duetto", argv
    args = parse_args(argv[1:])
    assert argv[1:3] == ["sweep", "run"] and args.sweep_action == "run", argv
    config, overrides = args.config, args.overrides
    assert (REPO / config).is_file(), f"{config} is not in the repository"
    sweep = load_sweep(REPO / config, overrides)  # raises ConfigError naming any key the sweep does not know
    assert sweep.storage_path.startswith(SHARED_MOUNT + "/"), "the sweep folder must be on the shared volume"
    for key in ("train", "test"):
        assert sweep.base["data"][key].startswith(SHARED_MOUNT + "/"), f"base.data.{key} must be on the shared volume"


def _check_runtime_env(env: dict, allow_missing_working_dir: bool = False) -> None:
    from ray.runtime_env import RuntimeEnv

    env = dict(env)
    if allow_missing_working_dir:
        env.pop("working_dir", None)  # a path inside the image; RuntimeEnv checks it exists here
    RuntimeEnv(**env)
    ev = env["env_vars"]
    assert ev["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ev["DUETTO_CACHE"].startswith(SHARED_MOUNT), "fetched models must be where every node reads them"
    assert "duetto-runs/" in env.get("excludes", []), "runs and their checkpoints must not be uploaded"


@pytest.mark.parametrize("name", YAMLS)
def test_each_file_starts_with_its_command(name):
    cmd = _first_command(CLUSTER / name)
    assert f"cluster/{name}" in cmd, cmd


def test_python_package_ships_the_cluster_files():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"duetto.cluster" = "cluster"' in pyproject
    assert '"kuberay/*.yaml"' in pyproject and '"duetto.cluster" = ["*.yaml"' in pyproject


# ---------------------------------------------------------------------------------------------
# images and Ray version
# ---------------------------------------------------------------------------------------------


def _dockerfile_image() -> tuple[str, str]:
    """(base image of cluster/Dockerfile, the tag its first-line command builds)."""
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    tag = re.search(r"docker build .*-t (\S+)", text.splitlines()[0]).group(1)
    return base, tag


def test_dockerfile_builds_on_the_installed_ray_and_installs_the_project():
    base, tag = _dockerfile_image()
    assert base == f"rayproject/ray:{_ray_version()}-py311-gpu"
    assert f"ray{_ray_version()}" in tag
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"pip install .*-e /home/ray/duetto", text), "the project must be installed (editable) in the image"
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "duetto-runs" in ignore


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("name", ["kuberay/rayjob-sweep.yaml", "kuberay/rayservice-ensemble.yaml"])
def test_kuberay_cluster_runs_our_image_with_gpus_and_the_shared_volume(name):
    doc = _load(name)
    spec = _cluster_spec(doc)
    assert doc["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == _ray_version()
    assert spec["authOptions"]["mode"] == "token"
    _, image = _dockerfile_image()
    claim = _load("kuberay/shared-volume.yaml")["metadata"]["name"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in groups:
        for c in _containers(group):
            assert c["image"] == image, f"{name}: {c['name']} must run the image cluster/Dockerfile builds"
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["RAY_USAGE_STATS_ENABLED"] == "0"
            assert env["DUETTO_CACHE"].startswith(SHARED_MOUNT)
            assert {"name": "shared", "mountPath": SHARED_MOUNT} in c["volumeMounts"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [claim]
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in spec["workerGroupSpecs"] for c in _containers(g)]
    assert gpus and all(g >= 1 for g in gpus), "the workers must ask Kubernetes for GPUs"
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


# ---------------------------------------------------------------------------------------------
# the sweep: RayJob, runtime env, launcher
# ---------------------------------------------------------------------------------------------


def test_rayjob_runs_the_study_sweep_on_the_shared_volume():
    doc = _load("kuberay/rayjob-sweep.yaml")
    assert doc["kind"] == "RayJob"
    _check_sweep_command(shlex.split(doc["spec"]["entrypoint"]))
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/duetto", "the job runs in the image's checkout (cluster/Dockerfile)"
    assert "/home/ray/duetto" in (CLUSTER / "Dockerfile").read_text()
    _check_runtime_env(env, allow_missing_working_dir=True)
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_runtime_env_file_and_its_submit_command():
    _check_runtime_env(_load("runtime_env.yaml"))
    argv = shlex.split(_first_command(CLUSTER / "runtime_env.yaml"))
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"
    assert argv[argv.index("--working-dir") + 1] == "."
    _check_sweep_command(argv[argv.index("--") + 1 :])


def test_launcher_is_a_valid_ray_cluster_config_with_gpu_workers():
    import jsonschema
    import ray

    cfg = _load("launcher.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == f"rayproject/ray:{_ray_version()}-py311-gpu"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in types.values())
    # the synced checkout is what every node installs
    target = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    assert any("pip install" in c and f"-e {target}" in c for c in cfg["setup_commands"])
    # the shared volume reaches the container, and Ray starts with the settings the local head uses
    assert any(f"{SHARED_MOUNT}:{SHARED_MOUNT}" in opt for opt in cfg["docker"]["run_options"])
    for cmd in (cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]):
        assert "RAY_USAGE_STATS_ENABLED=0" in cmd and "RAY_AUTH_MODE=" in cmd
        assert f"DUETTO_CACHE={SHARED_MOUNT}" in cmd
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in cfg["head_start_ray_commands"][-1]


# ---------------------------------------------------------------------------------------------
# the ensemble: RayService
# ---------------------------------------------------------------------------------------------


def test_rayservice_serves_our_app_builder_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    doc = _load("kuberay/rayservice-ensemble.yaml")
    assert doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    (app,) = serve_cfg["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)  # the import path resolves (no model load)
    assert callable(builder)

    from duetto.serve.config import config_from_args

    cfg = config_from_args(app["args"])  # the args are ServeConfig keys, validated like `duetto serve`'s
    assert cfg.from_sweep.startswith(SHARED_MOUNT + "/sweeps/")
    rayjob = _load("kuberay/rayjob-sweep.yaml")
    assert f"storage_path={cfg.from_sweep}" in rayjob["spec"]["entrypoint"], "serve the sweep the RayJob writes"
    # both models' replicas must fit on one worker's GPUs
    spec = _cluster_spec(doc)
    per_worker = max(int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in spec["workerGroupSpecs"] for c in _containers(g))
    need = cfg.generator_deployment.num_gpus * cfg.generator_deployment.num_replicas
    need += cfg.reranker_deployment.num_gpus * cfg.reranker_deployment.num_replicas
    assert 0 < need <= per_worker
    _check_runtime_env({**app["runtime_env"], "excludes": ["duetto-runs/"]})
    assert serve_cfg["http_options"]["port"] in [p["containerPort"] for p in _containers(spec["headGroupSpec"])[0]["ports"]]
