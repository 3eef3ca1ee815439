"""Serve the ``retrain`` flow as the deployment ``retrain/nightly`` with a cron schedule.

    PREFECT_API_URL=http://127.0.0.1:4200/api python pipelines/serve.py            # 02:00 daily
    python pipelines/serve.py --cron "*/30 * * * *" --param workdir=/srv/gara-checkout

The process registers the deployment on the Prefect server, then runs every scheduled or
on-demand run (``prefect deployment run retrain/nightly``) in a subprocess until stopped.
It is the no-work-pool way in; ``prefect.yaml`` deploys the same flow to the ``gara-pool``
work pool for a cluster (``prefect deploy --name nightly``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipelines` importable when run as a script

from pipelines.retrain import retrain  # noqa: E402

DEPLOYMENT = "nightly"
DEFAULT_CRON = "0 2 * * *"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default=DEPLOYMENT)
    parser.add_argument("--cron", default=DEFAULT_CRON, help="Cron schedule (UTC); '' for on-demand only.")
    parser.add_argument("--param", action="append", default=[],
                        help="Default flow parameter NAME=YAML_VALUE (workdir, data_rev, ray_address).")
    args = parser.parse_args(argv)
    import yaml

    parameters = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--param {item!r}: expected NAME=VALUE")
        parameters[key] = yaml.safe_load(value)
    retrain.serve(name=args.name, cron=args.cron or None, parameters=parameters,
                  tags=["gara", "retrain"], description="Scheduled retraining: pull data, then dvc.yaml's "
                  "stages (corrupt, train, evaluate, publish).")


if __name__ == "__main__":
    main()
