"""``gara promote``: the gate between ``challenger`` and ``champion``, and rollback.

A challenger becomes champion only when, on the same evaluation set (same images, labels
and prompt settings: ``gara.evaluation_set``), it beats the current champion on the gate
metric (``registry.gate.metric``, default Degrade box IoU) by at least ``gate.margin`` and
loses no more than ``gate.max_clear_drop`` on Clear. With no champion yet, the incumbent is
the frozen base from the challenger's own report. When the champion was scored on another
evaluation set, it is re-scored on the challenger's (``rescore``, supplied by the caller:
the CLI evaluates it on the current ``evaluate`` settings, which must reproduce the
challenger's set) rather than comparing numbers from different inputs.

Every decision is written on the challenger version as ``gara.*`` tags: the decision, the
reason, both scores and what it was compared with. A promoted version also records
``gara.previous_champion``, which ``rollback`` follows.

Races: deciding and moving the alias happen under :func:`gara.registry.store.promotion_lock`,
and the champion is read again right before the alias moves; if it changed, the decision is
made again against the new champion. Two promotions racing therefore end with the better
one as champion, never with the alias on a version that lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gara.config import GateConfig, Params
from gara.fsutil import atomic_write_json
from gara.registry.store import CHAMPION, client_for, promotion_lock, registry_uri

# rescore(champion_version) -> (gate score, clear score, evaluation set id)
Rescore = Callable[[Any], tuple[float, float, str]]


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

    def tags(self) -> dict[str, str]:
        def fmt(v: float | None) -> str:
            return "" if v is None else f"{v:.4f}"

        return {
            "gara.decision": "promoted" if self.promoted else "rejected",
            "gara.decision_reason": self.reason,
            "gara.compared_with": self.compared_with,
            "gara.challenger_gate_score": fmt(self.challenger_gate),
            "gara.incumbent_gate_score": fmt(self.incumbent_gate),
            "gara.challenger_clear_score": fmt(self.challenger_clear),
            "gara.incumbent_clear_score": fmt(self.incumbent_clear),
            "gara.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _tag_float(version, key: str) -> float:
    value = version.tags.get(key)
    if value in (None, ""):
        raise PromotionError(
            f"version {version.version} has no tag {key}; it was not registered by gara register")
    return float(value)


def judge(gate: GateConfig, challenger: tuple[float, float], incumbent: tuple[float, float], label: str
          ) -> tuple[bool, str]:
    """(promoted, reason) for challenger vs incumbent (gate score, clear score)."""
    (c_gate, c_clear), (i_gate, i_clear) = challenger, incumbent
    need = i_gate + gate.margin
    if c_gate < need:
        return False, (f"{gate.metric} {c_gate:.2f} does not beat {label}'s {i_gate:.2f} by the margin "
                       f"{gate.margin:g} (needs >= {need:.2f})")
    if c_clear < i_clear - gate.max_clear_drop:
        return False, (f"{gate.metric} {c_gate:.2f} beats {label}'s {i_gate:.2f}, but {gate.clear_metric} "
                       f"{c_clear:.2f} is more than {gate.max_clear_drop:g} below {label}'s {i_clear:.2f}")
    return True, (f"{gate.metric} {c_gate:.2f} beats {label}'s {i_gate:.2f} by {c_gate - i_gate:.2f} "
                  f"(margin {gate.margin:g}); {gate.clear_metric} {c_clear:.2f} vs {i_clear:.2f} "
                  f"(max drop {gate.max_clear_drop:g})")


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _incumbent_scores(challenger, champion, rescore: Rescore | None) -> tuple[float, float, str]:
    """The champion's scores on the challenger's evaluation set."""
    wanted = challenger.tags.get("gara.evaluation_set")
    if champion.tags.get("gara.evaluation_set") == wanted:
        return (_tag_float(champion, "gara.gate_score"), _tag_float(champion, "gara.clear_score"),
                f"version {champion.version}")
    if rescore is None:
        raise PromotionError(
            f"champion version {champion.version} was evaluated on set "
            f"{champion.tags.get('gara.evaluation_set')}, "
            f"challenger {challenger.version} on {wanted}: the scores are not comparable and no re-scoring "
            "was possible")
    gate_score, clear_score, got = rescore(champion)
    if got != wanted:
        raise PromotionError(
            f"re-scoring champion version {champion.version} used evaluation set {got}, but challenger "
            f"{challenger.version} was scored on {wanted}: re-run gara evaluate and gara register with the "
            "current evaluate settings")
    return gate_score, clear_score, f"version {champion.version} (re-scored on set {wanted})"


def evaluation_rescorer(params: Params, progress: bool = False) -> Rescore:
    """Re-score a champion with ``gara evaluate`` on the current ``evaluate`` settings."""

    def rescore(champion) -> tuple[float, float, str]:
        from gara.evaluate.report import build_metrics
        from gara.evaluate.runner import evaluate_models, resolve_model
        from gara.registry.register import summary_value

        spec = f"champion=models:/{params.registry.name}/{champion.version}"
        name, segmenter = resolve_model(spec, params.model, registry_uri(params))
        result = evaluate_models({name: segmenter}, params.evaluate.data, params.evaluate, progress=progress)
        summary = build_metrics(result)["models"][name]["summary"]
        where = f"re-scored champion version {champion.version}"
        gate = params.registry.gate
        return (summary_value(summary, gate.metric, where), summary_value(summary, gate.clear_metric, where),
                result.evaluation_set)

    return rescore


def decide(name: str, challenger, champion, gate: GateConfig, rescore: Rescore | None) -> Decision:
    c_scores = (_tag_float(challenger, "gara.gate_score"), _tag_float(challenger, "gara.clear_score"))
    if champion is not None and str(champion.version) == str(challenger.version):
        return Decision(name, str(challenger.version), False, "already champion", "itself",
                        *_pairs(c_scores, c_scores), champion=str(champion.version))
    if champion is None:
        if "gara.base_gate_score" not in challenger.tags:
            raise PromotionError(
                f"version {challenger.version}: no champion yet and its report has no frozen-base row "
                "(evaluate with --model base) to beat")
        i_scores = (_tag_float(challenger, "gara.base_gate_score"),
                    _tag_float(challenger, "gara.base_clear_score"))
        label, compared = "the frozen base", "base"
    else:
        gate_score, clear_score, compared = _incumbent_scores(challenger, champion, rescore)
        i_scores, label = (gate_score, clear_score), f"champion v{champion.version}"
    promoted, reason = judge(gate, c_scores, i_scores, label)
    after = challenger.version if promoted else (champion.version if champion else None)
    return Decision(name, str(challenger.version), promoted, reason, compared, *_pairs(c_scores, i_scores),
                    champion=None if after is None else str(after))


def _pairs(c: tuple[float, float], i: tuple[float, float]) -> tuple[float, float, float, float]:
    return c[0], i[0], c[1], i[1]


def promote(
    params: Params,
    version: str | int,
    rescore: Rescore | None = None,
    out: str | Path | None = None,
) -> Decision:
    """Decide challenger ``version`` against the current champion; move the alias if it wins."""
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
            decision = decide(name, challenger, champion, params.registry.gate, rescore)
            # Optimistic check: the champion must still be the one we decided against.
            now = _champion(client, name)
            if (now.version if now else None) == (champion.version if champion else None):
                break
        if decision.compared_with != "itself":
            tags = decision.tags()
            if decision.promoted:
                tags["gara.previous_champion"] = str(champion.version) if champion else ""
            for key, value in tags.items():
                client.set_model_version_tag(name, challenger.version, key, value)
            if decision.promoted:
                client.set_registered_model_alias(name, CHAMPION, challenger.version)
    if out is not None:
        atomic_write_json(Path(out), asdict(decision))
    return decision


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
