"""``gara promote``: the gate between ``challenger`` and ``champion``, and rollback.

The gate decides on evidence, not on point estimates. Challenger and incumbent are paired
on the same evaluation set (same images, labels and prompt settings:
``gara.evaluation_set``), instance by instance, from the per-instance records each version
carries (``evaluation/records.csv`` of its run), and the difference gets a bootstrap interval
over source images (:mod:`gara.evaluate.paired`, ``evaluate.bootstrap``). The challenger
becomes champion only when

- the gate metric's interval lies above ``gate.margin`` (``ci_low > margin``; default 0:
  a measurable gain), and
- the Clear interval lies above ``-gate.max_clear_drop`` (``ci_low > -max_clear_drop``).

A mean gain whose interval spans zero is not promoted: that is noise. With no champion yet
the incumbent is the frozen base (the base row of the challenger's own report); when it
wins, the frozen base itself is registered as an adapter-free version and made champion
(:func:`gara.registry.register.register_frozen_base`), so ``models:/NAME@champion`` always
resolves, and never to a model that lost to the base. A champion scored on another
evaluation set is re-scored on the challenger's (``rescore``, supplied by the caller: the CLI
evaluates it on the current ``evaluate`` settings) and then paired.

Every decision is written on the challenger version as ``gara.*`` tags: the decision, the
reason, the paired differences with their intervals, both scores and what it was compared
with. A promoted version also records ``gara.previous_champion``, which ``rollback`` follows.

Races: deciding and moving the alias happen under :func:`gara.registry.store.promotion_lock`,
and the champion is read again right before the alias moves; if it changed, the decision is
made again against the new champion. Two promotions racing therefore end with the better
one as champion, never with the alias on a version that lost.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gara.config import GateConfig, Params
from gara.evaluate.paired import Interval, SourceBootstrap
from gara.fsutil import atomic_write_json
from gara.registry.store import CHAMPION, client_for, promotion_lock, registry_uri

# rescore(champion_version) -> (its per-instance records on the current evaluation set, that set's id)
Rescore = Callable[[Any], tuple[pd.DataFrame, str]]
CHALLENGER_ROW, INCUMBENT_ROW = "challenger", "incumbent"


class PromotionError(ValueError):
    """A promotion or rollback cannot be decided; the message says why."""


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    compared_with: str  # "version N", "base", or "itself"
    challenger_gate: float
    incumbent_gate: float | None
    challenger_clear: float
    incumbent_clear: float | None
    champion: str | None  # the champion version after the decision
    gate_difference: dict[str, float | int] | None = None  # Interval.as_dict() of challenger - incumbent
    clear_difference: dict[str, float | int] | None = None

    def tags(self) -> dict[str, str]:
        def fmt(v: float | None) -> str:
            return "" if v is None else f"{v:.4f}"

        tags = {
            "gara.decision": "promoted" if self.promoted else "rejected",
            "gara.decision_reason": self.reason,
            "gara.compared_with": self.compared_with,
            "gara.challenger_gate_score": fmt(self.challenger_gate),
            "gara.incumbent_gate_score": fmt(self.incumbent_gate),
            "gara.challenger_clear_score": fmt(self.challenger_clear),
            "gara.incumbent_clear_score": fmt(self.incumbent_clear),
            "gara.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for label, diff in (("gate", self.gate_difference), ("clear", self.clear_difference)):
            for key, value in (diff or {}).items():
                tags[f"gara.{label}_{key}"] = str(value)
        return tags


def _tag_float(version, key: str) -> float:
    value = version.tags.get(key)
    if value in (None, ""):
        raise PromotionError(
            f"version {version.version} has no tag {key}; it was not registered by gara register")
    return float(value)


def _split_metric(path: str) -> tuple[str, str, str]:
    part, kind, metric = path.split(".")
    return part, kind, metric


def judge(gate: GateConfig, gate_diff: Interval, clear_diff: Interval, label: str) -> tuple[bool, str]:
    """(promoted, reason) from the paired differences challenger - incumbent."""
    evidence = (f"{gate.metric} {gate_diff.describe()}, {gate.clear_metric} {clear_diff.describe()} "
                f"against {label} ({gate_diff.n_sources} source images)")
    if gate_diff.ci_low <= gate.margin:
        return False, (f"{evidence}: the {gate.metric} interval does not lie above the margin "
                       f"{gate.margin:g}")
    if clear_diff.ci_low <= -gate.max_clear_drop:
        return False, (f"{evidence}: the {gate.clear_metric} interval reaches below "
                       f"-{gate.max_clear_drop:g} (max_clear_drop)")
    return True, (f"{evidence}: a measurable gain (margin {gate.margin:g}, "
                  f"max_clear_drop {gate.max_clear_drop:g})")


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_records(client, version) -> pd.DataFrame:
    """The per-instance records that a version was registered with (its report's records.csv)."""
    from mlflow.exceptions import MlflowException

    from gara.registry.register import RECORDS_ARTIFACT

    with tempfile.TemporaryDirectory(prefix="gara-records-") as tmp:
        try:
            local = client.download_artifacts(version.run_id, RECORDS_ARTIFACT, tmp)
        except (MlflowException, OSError) as exc:
            raise PromotionError(
                f"version {version.version}: its run {version.run_id} has no {RECORDS_ARTIFACT} to pair "
                f"with ({exc}); register it again with this version of gara") from None
        return pd.read_csv(local)


def candidate_row(version) -> str:
    """The report row a version was registered from."""
    row = version.tags.get("gara.candidate")
    if not row:
        raise PromotionError(
            f"version {version.version} has no tag gara.candidate; it was not registered by gara register")
    return row


def _rows(records: pd.DataFrame, model: str, label: str, where: str) -> pd.DataFrame:
    rows = records[records["model"] == model]
    if rows.empty:
        raise PromotionError(f"{where}: no records of model row {model!r}")
    return rows.assign(model=label)


def _incumbent_records(challenger, champion, client, rescore: Rescore | None) -> tuple[pd.DataFrame, str]:
    """The champion's records on the challenger's evaluation set, and how they were obtained."""
    wanted = challenger.tags.get("gara.evaluation_set")
    if champion.tags.get("gara.evaluation_set") == wanted:
        try:
            records = version_records(client, champion)
        except PromotionError:
            if rescore is None:
                raise  # registered before versions carried their records; re-scoring would do
        else:
            return _rows(records, candidate_row(champion), INCUMBENT_ROW,
                         f"champion version {champion.version}"), f"version {champion.version}"
    if rescore is None:
        raise PromotionError(
            f"champion version {champion.version} was evaluated on set "
            f"{champion.tags.get('gara.evaluation_set')}, "
            f"challenger {challenger.version} on {wanted}: the scores are not comparable and no re-scoring "
            "was possible")
    records, got = rescore(champion)
    if got != wanted:
        raise PromotionError(
            f"re-scoring champion version {champion.version} used evaluation set {got}, but challenger "
            f"{challenger.version} was scored on {wanted}: re-run gara evaluate and gara register with the "
            "current evaluate settings")
    return records.assign(model=INCUMBENT_ROW), f"version {champion.version} (re-scored on set {wanted})"


def evaluation_rescorer(params: Params, progress: bool = False) -> Rescore:
    """Re-score a champion with ``gara evaluate`` on the current ``evaluate`` settings."""

    def rescore(champion) -> tuple[pd.DataFrame, str]:
        from gara.evaluate.runner import evaluate_models, resolve_model

        spec = f"champion=models:/{params.registry.name}/{champion.version}"
        name, segmenter = resolve_model(spec, params.model, registry_uri(params))
        result = evaluate_models({name: segmenter}, params.evaluate.data, params.evaluate, progress=progress)
        return result.records, result.evaluation_set

    return rescore


@dataclass
class _Evidence:
    records: pd.DataFrame  # challenger and incumbent rows, paired
    compared_with: str
    label: str
    incumbent_is_base: bool  # no champion yet: the frozen base (it becomes champion if it holds)


def decide(name: str, challenger, champion, params: Params, client, rescore: Rescore | None
           ) -> tuple[Decision, _Evidence | None]:
    gate = params.registry.gate
    c_scores = (_tag_float(challenger, "gara.gate_score"), _tag_float(challenger, "gara.clear_score"))
    if champion is not None and str(champion.version) == str(challenger.version):
        return Decision(name, str(challenger.version), False, "already champion", "itself",
                        *_pairs(c_scores, c_scores), champion=str(champion.version)), None
    records = version_records(client, challenger)
    mine = _rows(records, candidate_row(challenger), CHALLENGER_ROW, f"version {challenger.version}")
    if champion is None:
        base_row = params.registry.base_row
        if base_row not in set(records["model"]):
            raise PromotionError(
                f"version {challenger.version}: no champion yet and its report has no frozen-base row "
                f"{base_row!r} (evaluate with --model base) to beat")
        theirs = _rows(records, base_row, INCUMBENT_ROW, f"version {challenger.version}")
        evidence = _Evidence(pd.concat([mine, theirs]), "base", "the frozen base", True)
    else:
        theirs, compared = _incumbent_records(challenger, champion, client, rescore)
        evidence = _Evidence(pd.concat([mine, theirs]), compared, f"champion v{champion.version}", False)
    boot = SourceBootstrap(evidence.records, params.evaluate.bootstrap)
    diffs, values = [], []
    for path in (gate.metric, gate.clear_metric):
        part, kind, metric = _split_metric(path)
        diff = boot.difference(CHALLENGER_ROW, INCUMBENT_ROW, part, kind, metric)
        incumbent = boot.value(INCUMBENT_ROW, part, kind, metric)
        if diff is None or incumbent is None:
            raise PromotionError(
                f"version {challenger.version}: {path} was not evaluated on set "
                f"{challenger.tags.get('gara.evaluation_set')}; the gate cannot decide on it")
        diffs.append(diff)
        values.append(round(incumbent.delta, 4))  # as the tags' scores
    promoted, reason = judge(gate, diffs[0], diffs[1], evidence.label)
    after = challenger.version if promoted else (champion.version if champion else None)
    decision = Decision(name, str(challenger.version), promoted, reason, evidence.compared_with,
                        *_pairs(c_scores, (values[0], values[1])),
                        champion=None if after is None else str(after),
                        gate_difference=diffs[0].as_dict(), clear_difference=diffs[1].as_dict())
    return decision, evidence


def _pairs(c: tuple[float, float], i: tuple[float, float]) -> tuple[float, float, float, float]:
    return c[0], i[0], c[1], i[1]


def promote(
    params: Params,
    version: str | int,
    rescore: Rescore | None = None,
    out: str | Path | None = None,
) -> Decision:
    """Decide challenger ``version`` against the current champion; move the alias if it wins.

    With no champion yet the frozen base is registered (adapter-free) first: it becomes
    champion if the challenger does not beat it, and is the challenger's
    ``gara.previous_champion`` (what ``rollback`` returns to) if it does."""
    from mlflow.exceptions import MlflowException

    name = params.registry.name
    uri = registry_uri(params)
    client = client_for(uri)
    try:
        challenger = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise PromotionError(f"model {name} version {version}: not in the registry ({exc.message})") from None
    with promotion_lock(uri, name):
        while True:
            champion = _champion(client, name)
            decision, evidence = decide(name, challenger, champion, params, client, rescore)
            # Optimistic check: the champion must still be the one we decided against.
            now = _champion(client, name)
            if (now.version if now else None) == (champion.version if champion else None):
                break
        if decision.compared_with != "itself":
            # The frozen base's version exists before anything is written (a failure leaves no
            # half-made decision behind).
            base = _frozen_base_version(params, client, challenger, evidence) if champion is None else None
            tags = decision.tags()
            if decision.promoted:
                tags["gara.previous_champion"] = str(champion.version if champion else base)
            for key, value in tags.items():
                client.set_model_version_tag(name, challenger.version, key, value)
            if decision.promoted:
                client.set_registered_model_alias(name, CHAMPION, challenger.version)
            elif base is not None:
                reason = (f"no adapter has beaten the frozen base yet (version {challenger.version} did not, "
                          f"on evaluation set {challenger.tags.get('gara.evaluation_set')})")
                client.set_model_version_tag(name, base, "gara.decision", "promoted")
                client.set_model_version_tag(name, base, "gara.decision_reason", reason)
                client.set_registered_model_alias(name, CHAMPION, base)
                decision.champion = base
    if out is not None:
        atomic_write_json(Path(out), asdict(decision))
    return decision


def _frozen_base_version(params: Params, client, challenger, evidence: _Evidence | None) -> str:
    """The registered frozen base (registered now, from the base rows the challenger was
    paired with, if it is not yet)."""
    from gara.registry.register import register_frozen_base

    assert evidence is not None and evidence.incumbent_is_base
    rows = evidence.records[evidence.records["model"] == INCUMBENT_ROW]
    experiment_id = client.get_run(challenger.run_id).info.experiment_id
    base = register_frozen_base(params, rows.assign(model=params.registry.base_row),
                                challenger.tags["gara.evaluation_set"],
                                challenger.tags.get("gara.evaluation_dataset", ""), experiment_id,
                                expected_sha256=challenger.tags.get("base_checkpoint_sha256"))
    return base.version


@dataclass
class Rollback:
    name: str
    from_version: str
    to_version: str
    reason: str


def rollback(params: Params, out: str | Path | None = None) -> Rollback:
    """Move ``champion`` back to the version it replaced (``gara.previous_champion``)."""
    name = params.registry.name
    uri = registry_uri(params)
    client = client_for(uri)
    with promotion_lock(uri, name):
        current = _champion(client, name)
        if current is None:
            raise PromotionError(f"model {name} has no champion to roll back")
        previous = current.tags.get("gara.previous_champion")
        if not previous:
            raise PromotionError(
                f"champion version {current.version} of {name} replaced no earlier champion: "
                "nothing to roll back to")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reason = f"rolled back at {stamp}: champion returned from version {current.version} to {previous}"
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_model_version_tag(name, current.version, "gara.decision", "rolled_back")
        client.set_model_version_tag(name, current.version, "gara.decision_reason", reason)
    result = Rollback(name, str(current.version), str(previous), reason)
    if out is not None:
        atomic_write_json(Path(out), asdict(result))
    return result
