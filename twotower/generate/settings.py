"""Decoding settings as one object, built the same way by every front end.

``resolve_settings(recommended, **given)`` is the one rule for how a model's recommendation
(its ``generation_config.json``) and what a user gave combine:

1. what the user gave wins; an option given as None counts as not given;
2. the recommended ``commit_rule`` applies unless one is given;
3. for mask diffusion, the recommended preset (``verify``, ``steps_per_block``, ``block_size``,
   say verified whole-block drafts of 4 tokens) applies as one unit, unless the user gave any
   option of the dial (``verify``, ``steps_per_block``, ``confidence_threshold``): then the
   plain dial applies. A ``block_size`` given alone replaces only the preset's block size, a
   ``fused`` given alone only the preset's fusion, and a ``tree_nodes`` given alone only the
   preset's tree; tree drafts are verified whole-block drafts, so a tree given without a
   verified preset selects them (``verify`` and ``steps_per_block=1``) unless those are given.
4. a strategy named instead of mode, verify and fused (a server's ``strategy`` field) sets those
   three; the recommended preset still applies when it is that strategy's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import UsageError
from .commit import COMMIT_RULES
from .stopping import check_stop_strings

DEFAULT_CONFIDENCE_THRESHOLD = 0.9  # the released model's default
DEFAULT_COMMIT_RULE = "threshold"  # the released rule (DESIGN.md §1)
PRESET_KEYS = ("verify", "fused", "steps_per_block", "block_size", "tree_nodes")  # a recommended preset of the dial
DIAL_KEYS = ("verify", "steps_per_block", "confidence_threshold")  # any of these given: the plain dial
# options that mean nothing for a mode (giving one is an error, not silently ignored)
UNUSED_BY_MODE = {
    "ar": ("block_size", "steps_per_block", "confidence_threshold", "commit_rule", "verify", "fused", "tree_nodes"),
    "mock_ar": ("block_size", "steps_per_block", "confidence_threshold", "verify", "fused", "tree_nodes"),
}


def _int(name: str, value, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
        raise UsageError(f"{name} must be a finite number {'in ' if high < math.inf else ''}{bounds}, got {value!r}")


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode: the mode and its dial, sampling, and when a row ends."""

    mode: str = "mask_diffusion"  # ar | mask_diffusion | mock_ar (the released modes)
    block_size: int | None = None  # None: the model's
    steps_per_block: int | None = None  # None: the block size
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    commit_rule: str = DEFAULT_COMMIT_RULE
    verify: bool = False  # drafts checked by the context tower: the output is AR's
    fused: bool = False  # towers share forwards (lora flavour): verified, one per step; the dial, one per block
    tree_nodes: int = 0  # verified: check a tree of the drafter's likeliest N continuations (0: one chain)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids; (): never stop early
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        from .strategies import modes  # the registry imports this module

        if not isinstance(self.mode, str) or self.mode not in modes():
            raise UsageError(f"unknown mode {self.mode!r} (choose from {', '.join(modes())})")
        _int("block_size", self.block_size, 1, optional=True)
        _int("steps_per_block", self.steps_per_block, 1, optional=True)
        _number("confidence_threshold", self.confidence_threshold, 0.0, 1.0)
        if not isinstance(self.commit_rule, str) or self.commit_rule not in COMMIT_RULES:
            raise UsageError(f"unknown commit rule {self.commit_rule!r} (choose from {', '.join(COMMIT_RULES)})")
        if not isinstance(self.verify, bool):
            raise UsageError(f"verify must be True or False, got {self.verify!r}")
        if not isinstance(self.fused, bool):
            raise UsageError(f"fused must be True or False, got {self.fused!r}")
        _int("tree_nodes", self.tree_nodes, 0)
        if self.tree_nodes and not (self.mode == "mask_diffusion" and self.verify and not self.fused
                                    and self.steps_per_block == 1):
            raise UsageError("tree_nodes: tree drafts are verified whole-block drafts (verify, steps_per_block 1, "
                             "not fused)")
        _number("temperature", self.temperature, 0.0)
        _int("top_k", self.top_k, 1, optional=True)
        if self.top_p is not None:
            _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.seed is not None:
            _int("seed", self.seed, 0)
        _int("max_new_tokens", self.max_new_tokens, 1)
        object.__setattr__(self, "stop_token_ids", _ids(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", check_stop_strings(self.stop_strings))

    @property
    def strategy(self) -> str:
        """The registered strategy these settings select (see ``strategies.STRATEGIES``)."""
        if self.mode == "mask_diffusion" and self.verify:
            return "fused" if self.fused else "verified"
        if self.mode == "mask_diffusion" and self.fused:
            return "fused_dial"
        return self.mode

    def replace(self, **changes) -> DecodingSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self, model_block_size: int) -> str:
        """The dial in words, for summary lines: e.g. "verified drafts of 4 tokens, rule left_prefix"."""
        if self.mode == "ar":
            return "AR"
        if self.mode == "mock_ar":
            return f"mock-AR, rule {self.commit_rule}"
        block = self.block_size or model_block_size
        fused = ", one forward per step" if self.fused else ""
        if self.tree_nodes:
            return f"verified tree drafts of {self.tree_nodes} tokens (blocks of {block})"
        if self.verify and self.steps_per_block == 1:  # one draft per block: the threshold plays no part
            size = f"up to {block}" if self.fused else str(block)  # fused: as long as the last pass allowed
            return f"verified drafts of {size} tokens, rule {self.commit_rule}{fused}"
        text = f"block {block}, threshold {self.confidence_threshold:g}, rule {self.commit_rule}"
        return text + (", verified" if self.verify else "") + fused

    def label(self, model_block_size: int) -> str:
        """A short name for tables and plots: e.g. "mask_diffusion S=16 t=0.9 verified"."""
        if self.mode != "mask_diffusion":
            return self.mode
        text = f"mask_diffusion S={self.block_size or model_block_size}"
        if self.steps_per_block != 1:  # with one step per block the threshold plays no part
            text += f" t={self.confidence_threshold:g}"
        text += " verified" if self.verify else ""
        return text + (" fused" if self.fused else "") + (f" tree={self.tree_nodes}" if self.tree_nodes else "")


def _ids(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | set | frozenset):
        raise UsageError(f"stop token ids must be a list of token ids, got {value!r}")
    for tok in value:
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise UsageError(f"stop token ids must be non-negative integers, got {tok!r}")
    return tuple(value)


FIELDS = tuple(f.name for f in dataclasses.fields(DecodingSettings))


# what each registered strategy's name means in settings (the inverse of DecodingSettings.strategy)
STRATEGY_OPTIONS = {
    "ar": {"mode": "ar"},
    "mock_ar": {"mode": "mock_ar"},
    "mask_diffusion": {"mode": "mask_diffusion", "verify": False, "fused": False},
    "verified": {"mode": "mask_diffusion", "verify": True, "fused": False},
    "fused": {"mode": "mask_diffusion", "verify": True, "fused": True},
    "fused_dial": {"mode": "mask_diffusion", "verify": False, "fused": True},
}


def _strategy_given(recommended: Mapping, strategy: str, given: dict) -> dict:
    if not isinstance(strategy, str) or strategy not in STRATEGY_OPTIONS:
        raise UsageError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGY_OPTIONS)})")
    options = STRATEGY_OPTIONS[strategy]
    clash = [k for k, v in options.items() if given.get(k) is not None and given[k] != v]
    if clash:
        raise UsageError(f"strategy {strategy} contradicts {', '.join(clash)}")
    if options.get("verify") == bool(recommended.get("verify")):
        # the recommended preset is of this kind: it applies as a unit, with this fusion
        options = {"mode": "mask_diffusion", "fused": options["fused"]}
    return {**given, **options}


def resolve_settings(recommended: Mapping | None = None, *, strategy: str | None = None, **given) -> DecodingSettings:
    """Settings from a model's recommendation and the options a user gave (see the module
    docstring for the rule)."""
    if strategy is not None:
        given = _strategy_given(recommended or {}, strategy, given)
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown decoding option(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    given = {k: v for k, v in given.items() if v is not None}
    recommended = dict(recommended or {})
    mode = given.get("mode", DecodingSettings.mode)
    if not isinstance(mode, str):
        raise UsageError(f"mode must be a mode's name, got {mode!r}")
    pointless = [k for k in UNUSED_BY_MODE.get(mode, ()) if k in given]
    if pointless:
        raise UsageError(f"{', '.join(pointless)}: not used by mode {mode}")
    values = {}
    if mode != "ar" and "commit_rule" in recommended:
        values["commit_rule"] = recommended["commit_rule"]
    if mode == "mask_diffusion" and not any(k in given for k in DIAL_KEYS):
        values.update({k: recommended[k] for k in PRESET_KEYS if k in recommended})
    values.update(given)
    if values.get("tree_nodes") and mode == "mask_diffusion":  # a tree is verified whole-block drafts
        values.update({k: v for k, v in (("verify", True), ("steps_per_block", 1)) if k not in given})
    return DecodingSettings(**values)


def settings_grid(recommended: Mapping | None, thresholds: Sequence[float] | None, block_sizes: Sequence[int] | None,
                  tree_nodes: Sequence[int] | None = None, **given) -> list[DecodingSettings]:
    """Mask-diffusion settings for a sweep (``bench speed``, ``eval quality``): one per (block
    size, threshold, tree), each by the rule of ``resolve_settings``, so with no dial option
    given the model's recommended preset (at each block size given). A threshold runs once where
    it plays no part (one step per block: the whole block is committed, or drafted, at once)."""
    out: list[DecodingSettings] = []
    for size in block_sizes or [None]:
        for nodes in tree_nodes or [None]:
            for threshold in thresholds or [None]:
                settings = resolve_settings(recommended, mode="mask_diffusion", block_size=size,
                                            confidence_threshold=threshold, tree_nodes=nodes, **given)
                if settings.steps_per_block == 1 and any(
                        (o.block_size, o.tree_nodes) == (settings.block_size, settings.tree_nodes) for o in out):
                    continue
                out.append(settings)
    return out
