"""The deployment files in infra/ parse, match the schemas available offline, and run only commands the CLI has
(with options it accepts)."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import typer
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs.cli import app

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = sorted((INFRA / "kuberay").glob("*.yaml"))


def reelmend_commands() -> list[tuple[str, list[str]]]:
    """Every reelmend command infra/ runs or tells its reader to run: RayJob entrypoints, the image's CMD, and
    the example command lines in comments (indented three spaces or more)."""
    found = []
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        for line in path.read_text().splitlines():
            example = re.match(r"\s*#\s{3,}(.*)", line)
            if example and "reelmend " in example.group(1):
                command = example.group(1)[example.group(1).index("reelmend "):]
                found.append((f"{path.relative_to(ROOT)}: {command}", shlex.split(command)[1:]))
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                if doc.get("kind") == "RayJob":
                    command = doc["spec"]["entrypoint"]
                    found.append((f"{path.relative_to(ROOT)}: {command}", shlex.split(command)[1:]))
    cmd = re.search(r"^CMD \[(.*)\]", (INFRA / "Dockerfile").read_text(), re.M)
    found.append(("infra/Dockerfile: CMD", json.loads(f"[{cmd.group(1)}]")[1:]))
    return found


def test_infra_names_reelmend_commands():
    names = {args[0] for _, args in reelmend_commands()}
    assert {"restore", "train"} <= names


@pytest.mark.parametrize("where,args", reelmend_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_in_infra_parses_with_the_cli(where, args):
    group = typer.main.get_command(app)
    if args == ["--help"]:
        return
    command = group.commands.get(args[0])
    assert command is not None, f"{where}: no such command"
    try:
        command.make_context(args[0], list(args[1:]))  # parses and validates every option; runs nothing
    except Exception as err:  # click's usage errors (typer vendors its own click)
        pytest.fail(f"{where}: {getattr(err, 'format_message', lambda: str(err))()}")


def test_cluster_launcher_config_matches_rays_schema():
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` does before launching anything
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5")) for t in types.values())


def test_kuberay_cluster_has_cpu_and_gpu_groups():
    (cluster,) = [d for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_kuberay_jobs_run_on_that_cluster():
    names = {d["metadata"]["name"] for p in KUBERAY for d in yaml.safe_load_all(p.read_text())
             if d["kind"] == "RayCluster"}
    jobs = [d for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d["kind"] == "RayJob"]
    assert {shlex.split(j["spec"]["entrypoint"])[1] for j in jobs} == {"restore", "train"}
    for job in jobs:
        assert job["apiVersion"] == "ray.io/v1"
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] in names


def test_dockerfile_builds_from_this_repository():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    packages = re.search(r"apt-get install ([^&]*)", text.replace("\\\n", " ")).group(1).split()
    # FFmpeg for the pipeline; rsync and ssh for the cluster launcher's bootstrap of a container (`ray up` copies
    # its files in with rsync over `docker exec`, and the head's updater reaches the workers over ssh); wget for
    # the exec probes KubeRay operators have used
    assert {"ffmpeg", "rsync", "openssh-client", "wget"} <= set(packages)
    # the head's AWS autoscaler imports boto3, which nothing else of the project needs: the image's extra has it
    assert 'pip install --no-cache-dir ".[cluster]"' in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("boto3") for req in extras["cluster"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)  # a legacy builder would send them (GBs) to the daemon
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in source.split():
            assert (ROOT / name).exists(), f"COPY {name}: not in the repository"
    torch_pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"torch=={torch_pin}" in text  # the same torch as the tested one, in its CUDA build


def test_no_credentials_in_infra():
    for path in (p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id
        assert not re.search(r"(?i)(secret_access_key|aws_secret)\s*[:=]\s*\S", text), path
        assert os.environ.get("AWS_SECRET_ACCESS_KEY", "never-set") not in text


def ray_start_commands() -> list[tuple[str, list[str]]]:
    """Every `ray start` the launcher config runs, and the one KubeRay builds from each group's rayStartParams."""
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    found = [(f"cluster.yaml: {line}", shlex.split(line)[2:])
             for key in ("head_start_ray_commands", "worker_start_ray_commands") for line in config[key]
             if line.startswith("ray start")]
    (cluster,) = [d for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d["kind"] == "RayCluster"]
    groups = [("head", cluster["spec"]["headGroupSpec"])] + [(g["groupName"], g)
                                                             for g in cluster["spec"]["workerGroupSpecs"]]
    for name, group in groups:
        params = [f"--{k}={v}" for k, v in group["rayStartParams"].items()]
        found.append((f"raycluster.yaml {name}: {params}", (["--head"] if name == "head" else []) + params))
    return found


@pytest.mark.parametrize("where,args", ray_start_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_ray_start_in_infra_parses_with_rays_cli(where, args):
    from ray.scripts.scripts import start

    args = [a.replace("$RAY_HEAD_IP", "10.0.0.1") for a in args]
    try:
        start.make_context("start", args)  # parses and validates every flag; starts nothing
    except Exception as err:  # click's usage errors
        pytest.fail(f"{where}: {getattr(err, 'format_message', lambda: str(err))()}")


def test_cluster_launcher_nodes_boot_an_image_with_gpu_drivers_and_docker():
    """The `docker:` block needs Docker on the host, the g5 workers an NVIDIA driver: AWS's Deep Learning Base AMI
    has both (a stock Ubuntu AMI has neither)."""
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    for name, node in config["available_node_types"].items():
        image = node["node_config"]["ImageId"]
        assert image == ("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                         "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"), (name, image)


def images() -> list[tuple[str, str]]:
    found = [("cluster.yaml docker.image", yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())["docker"]["image"])]
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc["spec"]
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]] if doc["kind"] == "RayCluster" else []
            found += [(f"{path.name}: {c['name']}", c["image"]) for g in groups for c in g["template"]["spec"]["containers"]]
    return found


def test_images_name_a_registry():
    """An image named without a registry ("reelmend:0.1.0") is pulled from Docker Hub's library, where there is no
    such image: the files name one (a placeholder the header says to replace)."""
    for where, image in images():
        host = image.split("/", 1)[0]
        assert "/" in image and ("." in host or ":" in host), f"{where}: {image} names no registry"


def test_kuberay_cluster_converts_to_the_autoscaler_config_ray_derives():
    """What Ray's autoscaler makes of the RayCluster (its own converter, offline): both worker groups scale from
    zero, the GPU group offers a GPU, the CPU group the resource `--cpu-resource cpu_node` asks for, the head no
    CPU for chunk work."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    (cluster,) = [d for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d["kind"] == "RayCluster"]
    cluster["metadata"].setdefault("namespace", "default")  # kubectl fills it in
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    types = config["available_node_types"]
    assert types["cpu"]["resources"]["cpu_node"] == 1000 and "GPU" not in types["cpu"]["resources"]
    assert types["gpu"]["resources"]["GPU"] == 1 and "cpu_node" not in types["gpu"]["resources"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    for name in ("cpu", "gpu"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] > 0
    assert config["max_workers"] >= types["cpu"]["max_workers"] + types["gpu"]["max_workers"]
