"""What a downstream team pays to use a registered version without this repository.

For a model URI (default ``models:/<registry.name>@champion`` in the repo's tracking store,
i.e. after ``make run``): the size of the version's artifacts, the requirements it lists
(``mlflow.pyfunc.get_model_dependencies``), the time to build a fresh virtual environment
holding only those (and what they depend on) from uv's cache, and the time of a cold pull
(download + load) and a first predict in that environment, with this project not installed.

    python bench/bench_pull.py
    python bench/bench_pull.py --model models:/gara-sam/2

Offline by design: the environment is installed from uv's cache (``--offline``), at the
versions installed here, so nothing but the tracking store is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PULL = """
import importlib.util, io, json, sys, time
assert importlib.util.find_spec("gara") is None, "gara must not be installed here"
import numpy as np, pandas as pd, mlflow.pyfunc
from PIL import Image
start = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter() - start
buffer = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, "PNG")
start = time.perf_counter()
out = model.predict(pd.DataFrame([{"image": buffer.getvalue(), "boxes": [[100.0, 80.0, 400.0, 360.0]]}]))
predict_s = time.perf_counter() - start
# What a served answer weighs for a large photo: the JSON of the mask as an array and as RLE.
buffer = io.BytesIO()
Image.fromarray(np.full((4000, 4000, 3), 90, np.uint8)).save(buffer, "PNG")
big = pd.DataFrame([{"image": buffer.getvalue(), "boxes": [[800.0, 700.0, 3100.0, 3300.0]]}])
as_array = model.predict(big).iloc[0]["masks"]
as_rle = model.predict(big, params={"mask_format": "rle"}).iloc[0]["masks"]
print(json.dumps({"load_s": loaded, "predict_s": predict_s,
                  "array_json_bytes": len(json.dumps(np.asarray(as_array).tolist())),
                  "rle_json_bytes": len(json.dumps(as_rle))}))
"""


def requirement_closure(requirements: list[str]) -> list[str]:
    """``name==version`` for the requirements and everything they depend on, at the versions
    installed here: what an installer would resolve for a fresh environment, found without the
    network so that uv can install it from its cache (``uv pip sync --offline``)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = distribution(req.name)
        if not req.specifier.contains(dist.version, prereleases=True):
            raise RuntimeError(f"{req} is required, but {dist.version} is what is installed here")
        pins[key[0]] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(dep)
    return sorted(f"{name}=={version}" for name, version in pins.items())


def listed_requirements(model_uri: str) -> list[str]:
    import mlflow.pyfunc

    path = mlflow.pyfunc.get_model_dependencies(model_uri)
    return [line.strip() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def fresh_environment(requirements: list[str], where: Path) -> Path:
    """A new virtual environment at ``where`` with exactly the closure of ``requirements``."""
    uv = str(Path(sys.executable).with_name("uv"))
    pins = where.with_suffix(".txt")
    pins.write_text("\n".join(requirement_closure(requirements)) + "\n")
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    subprocess.run([uv, "pip", "sync", "-q", "--offline", "--python", str(python), str(pins)],
                   check=True, timeout=900)
    return python


def version_bytes(model_uri: str) -> int:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        return sum(p.stat().st_size for p in local.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model URI (default: models:/<registry.name>@champion)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    from gara.config import load_params
    from gara.registry.store import registry_uri
    from gara.tracking import active_store, redact_uri

    params = load_params(args.params)
    store = registry_uri(params)
    model = args.model or f"models:/{params.registry.name}@champion"
    with active_store(store):
        listed = listed_requirements(model)
        size = version_bytes(model)
    print(f"{model} in {redact_uri(store)}: {size / 1e6:.2f} MB of artifacts; {len(listed)} requirements:")
    print("  " + " ".join(listed))
    with tempfile.TemporaryDirectory(prefix="gara-pull-") as tmp:
        start = time.perf_counter()
        python = fresh_environment(listed, Path(tmp) / "env")
        installed = time.perf_counter() - start
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update({"MLFLOW_TRACKING_URI": store, "GARA_CACHE_DIR": str(Path(tmp) / "cache")})
        proc = subprocess.run([str(python), "-c", PULL, model], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            sys.exit(f"the pull failed in the fresh environment:\n{proc.stderr[-3000:]}")
        pulled = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"fresh environment from uv's cache: {installed:.1f} s")
    print(f"cold pull (download + load): {pulled['load_s']:.1f} s; first predict on a 640x480 image: "
          f"{pulled['predict_s']:.2f} s")
    print(f"one mask of a 4000x4000 image as JSON: array {pulled['array_json_bytes'] / 1e6:.1f} MB, "
          f"RLE {pulled['rle_json_bytes'] / 1e3:.1f} KB")


if __name__ == "__main__":
    main()
