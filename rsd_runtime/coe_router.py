"""Which expert answers a prompt: rules from a TOML file, then a classifier, then a default.

    name = "coe"                       # the model name clients send (default "coe")
    default = "general"                # when nothing else decides
    [[rule]]                           # rules in order; the first that matches wins
    expert = "code"
    contains = ["def ", "import "]     # the prompt's text holds one of these
    [[rule]]
    expert = "math"
    token_ids = [17, 42]               # the prompt holds one of these token ids
    [classifier]                       # a small model run on a card of its own
    model = "path/to/checkpoint"
    experts = ["general", "code", "math"]
    label_token_ids = [0, 1, 2]        # expert i scores the logit of this token (default: i)

The classifier is a head over a small transformer's last hidden state: the
checkpoint's LM head restricted to one row per expert (``label_token_ids``), read
at the prompt's last position; the highest score wins, the first on a tie. Its
forward pass runs on the cards and costs emulated time like any prefill.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from interconnect.topo_toml import read_toml


@dataclass(slots=True, frozen=True)
class Rule:
    expert: str
    contains: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()

    def matches(self, text: str | None, ids: list[int]) -> bool:
        if text is not None and any(s in text for s in self.contains):
            return True
        return bool(self.token_ids) and not set(self.token_ids).isdisjoint(ids)


@dataclass(slots=True)
class Classifier:
    model: str
    experts: list[str]
    label_token_ids: list[int]

    def choose(self, last_logits) -> str:
        """The expert whose label token scores highest in the last position's logits (vocab,)."""
        scores = [float(last_logits[t]) for t in self.label_token_ids]
        return self.experts[scores.index(max(scores))]


@dataclass(slots=True)
class RouterConfig:
    name: str = "coe"
    default: str | None = None
    rules: list[Rule] = field(default_factory=list)
    classifier: Classifier | None = None

    @classmethod
    def from_toml(cls, path: str | Path) -> "RouterConfig":
        doc = read_toml(path, "router")
        unknown = set(doc) - {"name", "default", "rule", "classifier"}
        if unknown:
            raise ValueError(f"router file {path}: unknown keys {sorted(unknown)}; known: name, default, rule, "
                             f"classifier")
        rules = []
        for i, r in enumerate(doc.get("rule", [])):
            if "expert" not in r or not ({"contains", "token_ids"} & set(r)):
                raise ValueError(f"router file {path}: rule {i} needs 'expert' and 'contains' or 'token_ids'")
            rules.append(Rule(r["expert"], tuple(r.get("contains", ())), tuple(r.get("token_ids", ()))))
        clf = None
        if "classifier" in doc:
            c = doc["classifier"]
            if "model" not in c or not c.get("experts"):
                raise ValueError(f"router file {path}: [classifier] needs 'model' and 'experts'")
            model = str((Path(path).parent / c["model"]) if not Path(c["model"]).is_absolute() else c["model"])
            labels = list(c.get("label_token_ids", range(len(c["experts"]))))
            if len(labels) != len(c["experts"]):
                raise ValueError(f"router file {path}: {len(labels)} label_token_ids for {len(c['experts'])} experts")
            clf = Classifier(model, list(c["experts"]), labels)
        cfg = cls(doc.get("name", "coe"), doc.get("default"), rules, clf)
        if cfg.default is None and cfg.classifier is None:
            raise ValueError(f"router file {path}: give a 'default' expert or a [classifier]")
        return cfg

    def experts(self) -> list[str]:
        """Every expert the router may choose."""
        out = [r.expert for r in self.rules] + ([self.default] if self.default else [])
        return out + (self.classifier.experts if self.classifier else [])

    def check(self, vocab_sizes: dict[str, int]) -> None:
        """Refuse a router over experts it does not know or of different vocabularies (``vocab_sizes``: the
        served experts', and the classifier's, by name)."""
        unknown = sorted({e for e in self.experts() if e not in vocab_sizes})
        if unknown:
            served = [n for n in vocab_sizes if not n.startswith("classifier ")]
            raise ValueError(f"router {self.name!r} names experts this engine does not serve: {unknown}; "
                             f"served: {', '.join(served)}")
        if self.name in vocab_sizes:
            raise ValueError(f"router name {self.name!r} is also an expert's name")
        (first, v0), *rest = vocab_sizes.items()
        other = next(((n, v) for n, v in rest if v != v0), None)
        if other is not None:
            raise ValueError(f"experts {first!r} (vocabulary {v0}) and {other[0]!r} (vocabulary {other[1]}) cannot "
                             f"share router {self.name!r}: a router reads one vocabulary")

    def by_rules(self, text: str | None, ids: list[int]) -> str | None:
        """The first matching rule's expert; None if no rule matches."""
        return next((r.expert for r in self.rules if r.matches(text, ids)), None)
